"""The Hugging Face zoo: tiny configs of twelve transformer families, built offline.

``mudsc-fx check --zoo hf`` sweeps :func:`hf_zoo`. Every model is built from its config class
with random weights (no hub access) and small enough for a float64 proof in seconds; the
example inputs are what HF users pass: ``{"input_ids", "attention_mask"}`` or
``{"pixel_values"}``. :func:`permute_mlp` plants a permutation of the MLP hidden units by hand
(independently of mudsc_fx), for the merge-back check: merging a model with its permuted copy
must give the model back.
"""
from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

VOCAB, SEQ, BATCH, IMAGE = 100, 8, 2, 16


@dataclass(frozen=True)
class Family:
    """A tiny config: the model class and config class names in ``transformers``, the config
    arguments, the input kind ("text" or "image"), and the MLP of each layer as
    (module name suffixes whose output units are the hidden units, the suffix that reads them)."""
    model: str
    config: str
    kwargs: dict
    inputs: str
    mlp_out: tuple[str, ...]
    mlp_in: str
    note: str

    def build(self, seed: int = 0) -> nn.Module:
        import transformers
        cfg = getattr(transformers, self.config)(**self.kwargs)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return getattr(transformers, self.model)(cfg).eval()

    def example(self, seed: int = 0, batch: int = BATCH) -> dict:
        g = torch.Generator().manual_seed(1000 + seed)
        if self.inputs == "image":
            return {"pixel_values": torch.randn(batch, 3, IMAGE, IMAGE, generator=g)}
        ids = torch.randint(0, VOCAB, (batch, SEQ), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


_TEXT = dict(vocab_size=VOCAB, max_position_embeddings=64)
_LAYERS = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64)
_ROPE_GQA = dict(_TEXT, **_LAYERS, num_key_value_heads=2)
_VISION = dict(_LAYERS, image_size=IMAGE, patch_size=4)

FAMILIES: dict[str, Family] = {
    "gpt2": Family("GPT2LMHeadModel", "GPT2Config",
                   dict(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0,
                        eos_token_id=0), "text", ("mlp.c_fc",), "mlp.c_proj",
                   "Conv1D [in, out] weights, fused qkv, learned positions, tied LM head"),
    "bert": Family("BertForSequenceClassification", "BertConfig", dict(_TEXT, **_LAYERS, num_labels=3), "text",
                   ("intermediate.dense",), "output.dense", "post-norm encoder, token types, pooler, classifier"),
    "llama": Family("LlamaForCausalLM", "LlamaConfig", _ROPE_GQA, "text",
                    ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", "RoPE, GQA (4 q heads, 2 kv), SwiGLU, RMSNorm"),
    "qwen2": Family("Qwen2ForCausalLM", "Qwen2Config", _ROPE_GQA, "text",
                    ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", "Llama-like with q/k/v biases"),
    "mistral": Family("MistralForCausalLM", "MistralConfig", dict(_ROPE_GQA, sliding_window=4), "text",
                      ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", "Llama-like with sliding-window mask"),
    "vit": Family("ViTForImageClassification", "ViTConfig", dict(_VISION, num_labels=3), "image",
                  ("mlp.fc1",), "mlp.fc2", "patch conv, cls token, learned positions"),
    "clip_vision": Family("CLIPVisionModel", "CLIPVisionConfig", _VISION, "image", ("mlp.fc1",), "mlp.fc2",
                          "pre-norm, quick-GELU, position embedding table"),
    "t5_encoder": Family("T5EncoderModel", "T5Config",
                         dict(num_layers=2, d_model=32, d_kv=8, num_heads=4, d_ff=64, vocab_size=VOCAB), "text",
                         ("DenseReluDense.wi",), "DenseReluDense.wo",
                         "RMS norm, relative attention bias shared by the layers, no biases"),
    "distilbert": Family("DistilBertForSequenceClassification", "DistilBertConfig",
                         dict(n_layers=2, dim=32, n_heads=4, hidden_dim=64, vocab_size=VOCAB,
                              max_position_embeddings=64), "text", ("ffn.lin1",), "ffn.lin2",
                         "post-norm encoder, pre-classifier"),
    "opt": Family("OPTForCausalLM", "OPTConfig",
                  dict(_TEXT, num_hidden_layers=2, hidden_size=32, num_attention_heads=4, ffn_dim=64,
                       word_embed_proj_dim=32), "text", ("fc1",), "fc2",
                  "learned positions with an offset (cumsum of the mask), tied LM head"),
    "gpt_neox": Family("GPTNeoXForCausalLM", "GPTNeoXConfig", dict(_TEXT, **_LAYERS, rotary_pct=0.5), "text",
                       ("mlp.dense_h_to_4h",), "mlp.dense_4h_to_h",
                       "fused qkv interleaved per head, partial rotary, parallel attention + MLP"),
    "phi": Family("PhiForCausalLM", "PhiConfig", dict(_TEXT, **_LAYERS, partial_rotary_factor=0.5), "text",
                  ("mlp.fc1",), "mlp.fc2", "parallel attention + MLP, partial rotary, one LayerNorm per block"),
}


def hf_zoo(pattern: Optional[str] = None) -> list:
    """The zoo entries (name, factory, example inputs) for ``mudsc-fx check --zoo hf``."""
    return [(name, fam.build, fam.example) for name, fam in FAMILIES.items()
            if not pattern or fnmatch.fnmatchcase(name, pattern)]


def permute_mlp(model: nn.Module, family: str, seed: int = 1) -> nn.Module:
    """A copy of ``model`` with the hidden units of every MLP permuted at random (by hand:
    rows of the producing weights and biases, columns of the reading weight). The copy
    computes exactly what the model computes."""
    from transformers.pytorch_utils import Conv1D
    fam = FAMILIES[family]
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    mods = dict(out.named_modules())
    done = 0
    with torch.no_grad():
        for name, mod in mods.items():
            if not name.endswith(fam.mlp_in):
                continue
            prefix = name[: -len(fam.mlp_in)]
            if not all(prefix + s in mods for s in fam.mlp_out):  # BERT's attention.output.dense
                continue
            ups = [mods[prefix + s] for s in fam.mlp_out]
            n = _units(ups[0], Conv1D)
            perm = torch.randperm(n, generator=g)
            for up in ups:
                _permute(up, perm, Conv1D, out_axis=True)
            _permute(mod, perm, Conv1D, out_axis=False)
            done += 1
    if not done:
        raise ValueError(f"no MLP of family {family!r} found in {type(model).__name__}")
    return out


def _units(m: nn.Module, conv1d: type) -> int:
    return m.weight.shape[1] if isinstance(m, conv1d) else m.weight.shape[0]


def _permute(m: nn.Module, perm: torch.Tensor, conv1d: type, out_axis: bool) -> None:
    # nn.Linear stores [out, in]; GPT-2's Conv1D stores [in, out]
    axis = (1 if isinstance(m, conv1d) else 0) if out_axis else (0 if isinstance(m, conv1d) else 1)
    m.weight.copy_(m.weight.index_select(axis, perm))
    if out_axis and getattr(m, "bias", None) is not None:
        m.bias.copy_(m.bias[perm])


@dataclass(frozen=True)
class MergeBack:
    """A model merged with its MLP-permuted copy (act_align): the proof the merge ran first
    (ok, error), the graph's coverage, and the largest output difference between the merged
    model and the original (0 when the merge found the planted permutation)."""
    family: str
    proven: bool
    proof_error: float
    coverage: float
    error: float
    reload_error: Optional[float] = None


def merge_back(family: str, *, n_batches: int = 3, seed: int = 0, out_dir: Optional[str] = None) -> MergeBack:
    """Merge a tiny model of ``family`` with its MLP-permuted copy on dict batches. With
    ``out_dir`` the merged model is also written there (``save_pretrained``) and loaded back
    (``from_pretrained``); ``reload_error`` compares the reloaded model's outputs with it."""
    import mudsc_fx as mf
    from .ir.inputs import call_model
    from .ir.inputs import flat_tensors
    fam = FAMILIES[family]
    a = fam.build(seed)
    b = permute_mlp(a, family, seed + 1)
    batches = [fam.example(seed + k, batch=4) for k in range(n_batches)]
    res = mf.Merger([a, b], batches).merge("act_align", reset_bn=False)
    x = batches[0]
    with torch.no_grad():
        ref, got = flat_tensors(call_model(a, x)), flat_tensors(call_model(res.model, x))
    err = max((r - m).abs().max().item() for r, m in zip(ref, got) if r.is_floating_point())
    reload_err = None
    if out_dir is not None:  # the transformers round trip (mudsc_fx.hf wraps these two calls)
        res.model.save_pretrained(out_dir, safe_serialization=True)
        with torch.no_grad():
            again = flat_tensors(call_model(type(res.model).from_pretrained(out_dir, local_files_only=True).eval(), x))
        reload_err = max((m - r).abs().max().item() for m, r in zip(got, again) if m.is_floating_point())
    v = res.verification
    return MergeBack(family, v is not None and v.ok, v.max_abs_err if v else float("nan"), res.graph.coverage(), err,
                     reload_err)
