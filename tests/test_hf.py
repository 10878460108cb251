"""Hugging Face transformers through the torch.export front end: tiny configs built in the
test (no hub). The default suite proves and merges one family; the zoo marker runs all twelve
and checks the symmetry each family is known to have."""
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import mudsc_fx as mf  # noqa: E402
from mudsc_fx.hf_zoo import FAMILIES, merge_back, permute_mlp  # noqa: E402
from mudsc_fx.ir.inputs import call_model  # noqa: E402

ALL = list(FAMILIES)


def _infer(family):
    fam = FAMILIES[family]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mf.infer(fam.build(), fam.example())


def _spaces_of(pg, fqn, axis):
    return [s for s in pg.spaces if any(m.fqn == fqn and m.axis == axis for m in s.members)]


def test_gpt2_symmetries_are_proven():
    """Conv1D [in, out] weights, fused qkv, learned positions, tied input/output embeddings."""
    fam = FAMILIES["gpt2"]
    rep = mf.check(fam.build(), fam.example())
    assert rep.ok and rep.max_abs_err < 1e-10
    assert rep.coverage == 1.0 and not rep.barriers
    pg = rep.graph
    qk, v = _spaces_of(pg, "transformer.h.0.attn.c_attn.weight", 1)  # [in, out]: concat(q, k, v) on axis 1
    assert qk.blocks == v.blocks == (4, 8) and qk.head == v.head and not pg.spaces[qk.head].fixed
    assert pg.is_free(qk.id) and pg.is_free(v.id)
    assert any(m.fqn == "transformer.h.0.attn.c_proj.weight" and m.axis == 0 for m in v.members)
    assert ("lm_head.weight", "transformer.wte.weight") in pg.aliases
    resid = _spaces_of(pg, "transformer.wpe.weight", 1)
    assert resid and pg.is_free(resid[0].id)
    assert any(m.fqn == "transformer.wte.weight" and m.axis == 1 for m in resid[0].members)


def test_permute_mlp_keeps_the_function():
    fam = FAMILIES["llama"]
    a = fam.build()
    b = permute_mlp(a, "llama")
    x = fam.example()
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, b.model.layers[0].mlp.up_proj.weight)
    torch.testing.assert_close(call_model(a, x).logits, call_model(b, x).logits)


@pytest.mark.zoo
@pytest.mark.parametrize("family", ALL)
def test_family_is_proven_and_merges_back_from_a_permuted_copy(family, tmp_path):
    """The merge proves the graph on the first dict batch (mf.check), then act_align finds
    the planted MLP permutation: the merged model is the original; written with
    save_pretrained it loads back through the hf: source."""
    r = merge_back(family, out_dir=str(tmp_path / "merged"))
    assert r.proven, (family, r.proof_error)
    assert r.coverage >= 0.5, (family, r.coverage)
    assert r.error < 1e-4, (family, r.error)
    assert r.reload_error == 0.0, (family, r.reload_error)


@pytest.mark.zoo
def test_llama_rope_and_gqa_structure():
    """RoPE pins q/k units inside heads; q heads move with their key/value group."""
    pg = _infer("llama")
    (q,) = _spaces_of(pg, "model.layers.0.self_attn.q_proj.weight", 0)
    (k,) = _spaces_of(pg, "model.layers.0.self_attn.k_proj.weight", 0)
    (v,) = _spaces_of(pg, "model.layers.0.self_attn.v_proj.weight", 0)
    (o,) = _spaces_of(pg, "model.layers.0.self_attn.o_proj.weight", 1)
    assert q.blocks == (2, 16) and k.blocks == (2, 8) and v.blocks == (2, 8)  # 2 kv groups
    assert q.head == k.head == v.head == o.head and not pg.spaces[q.head].fixed
    assert q.within == k.within == "identity"
    (gate,) = _spaces_of(pg, "model.layers.0.mlp.gate_proj.weight", 0)
    assert any(m.fqn == "model.layers.0.mlp.up_proj.weight" for m in gate.members)  # SwiGLU sharing
    assert pg.is_free(gate.id)


@pytest.mark.zoo
def test_t5_relative_attention_bias_follows_the_heads():
    pg = _infer("t5_encoder")
    (bias,) = _spaces_of(pg, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", 1)
    (q,) = _spaces_of(pg, "encoder.block.0.layer.0.SelfAttention.q.weight", 0)
    assert bias.kind == "head" and q.head == bias.id and not bias.fixed
    # the bias is shared: every layer's heads move with it
    (q1,) = _spaces_of(pg, "encoder.block.1.layer.0.SelfAttention.q.weight", 0)
    assert q1.head == bias.id


_PARALLEL = {"gpt_neox": ("gpt_neox.layers.0.attention.dense.weight", "gpt_neox.layers.0.mlp.dense_4h_to_h.weight",
                         "gpt_neox.layers.0.attention.query_key_value.weight"),
             "phi": ("model.layers.0.self_attn.dense.weight", "model.layers.0.mlp.fc2.weight",
                     "model.layers.0.self_attn.q_proj.weight")}


@pytest.mark.zoo
@pytest.mark.parametrize("family", list(_PARALLEL))
def test_parallel_blocks_and_partial_rotary(family):
    """Attention and MLP outputs are added to one residual stream; the rotary half of q/k pins
    the units inside each head (the pass-through half with it), heads still move."""
    attn_out, mlp_out, q = _PARALLEL[family]
    pg = _infer(family)
    assert pg.coverage() == 1.0
    (a,), (m,) = _spaces_of(pg, attn_out, 0), _spaces_of(pg, mlp_out, 0)
    assert a.id == m.id and pg.is_free(a.id)
    qs = _spaces_of(pg, q, 0)
    assert qs and all(s.within == "identity" and s.blocks and not pg.spaces[s.head].fixed for s in qs)


def test_hf_source_reads_a_directory_a_config_file_and_a_zoo_name(tmp_path):
    import json
    from mudsc_fx.hf import example_for, save_pretrained
    from mudsc_fx.sources import ModelSpecError
    from mudsc_fx.sources import load_model
    fam = FAMILIES["llama"]
    model = fam.build()
    save_pretrained(model, tmp_path / "full")
    again = load_model(f"hf:{tmp_path / 'full'}")
    assert type(again) is type(model)
    x = example_for(str(tmp_path / "full"))
    assert set(x) == {"input_ids", "attention_mask"} and int(x["input_ids"].max()) < model.config.vocab_size
    torch.testing.assert_close(call_model(again, x).logits, call_model(model, x).logits, rtol=0, atol=0)
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text((tmp_path / "full" / "config.json").read_text())
    torch.manual_seed(12345)  # the global generator decides a config-only model's weights
    random = load_model(f"hf:{tmp_path / 'cfg'}")  # config only: random weights, same class
    assert type(random) is type(model) and not torch.equal(random.lm_head.weight, model.lm_head.weight)
    cfg = json.loads((tmp_path / "full" / "config.json").read_text())
    (tmp_path / "vit.json").write_text(json.dumps({"model_type": "vit", "architectures": ["ViTModel"],
                                                  "hidden_size": 32, "num_hidden_layers": 1,
                                                  "num_attention_heads": 2, "intermediate_size": 64,
                                                  "image_size": 16, "patch_size": 8}))
    vit = load_model(f"hf:{tmp_path / 'vit.json'}")
    assert type(vit).__name__ == "ViTModel" and set(example_for(str(tmp_path / "vit.json"))) == {"pixel_values"}
    assert type(load_model("hf:gpt2")).__name__ == "GPT2LMHeadModel" and cfg["model_type"] == "llama"
    with pytest.raises(ModelSpecError, match="hub is not used"):
        load_model("hf:meta-llama/Llama-3-8B")


def test_transformers_modules_as_fx_leaves_have_rows():
    """GPT-2's Conv1D ([in, out] weight) and HF activation modules kept as fx leaves."""
    from transformers.activations import NewGELUActivation
    from transformers.pytorch_utils import Conv1D

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act, self.proj, self.head = Conv1D(16, 8), NewGELUActivation(), Conv1D(8, 16), \
                torch.nn.Linear(8, 3)

        def forward(self, x):
            return self.head(x + self.proj(self.act(self.fc(x))))

    torch.manual_seed(0)
    model = Block().eval()
    with torch.no_grad():
        model.fc.bias.normal_()
    x = torch.randn(2, 5, 8)
    gm = mf.trace(model, x, leaf_modules=[Conv1D, NewGELUActivation], frontend="fx")
    assert {n.target for n in gm.graph.nodes if n.op == "call_module"} == {"fc", "act", "proj", "head"}
    rep = mf.check(model, x, leaf_modules=[Conv1D, NewGELUActivation], frontend="fx")
    assert rep.ok and not rep.barriers and rep.n_free == 1  # the 16 hidden units (residual meets the input)
    (hidden,) = _spaces_of(rep.graph, "fc.weight", 1)
    assert pytest.approx(rep.coverage) == 16 / (16 + 8) and hidden.size == 16
