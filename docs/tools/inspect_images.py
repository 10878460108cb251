"""Make the images of docs/inspect.md and the README: pictures of permutation graphs, and
screenshots of the interactive page taken with headless Chromium.

    python docs/tools/inspect_images.py            # writes docs/img/inspect_*.png
    python docs/tools/inspect_images.py --no-shots # pictures only (no Chromium needed)
    python docs/tools/inspect_images.py --no-merge # without the merge example (no training)

Chromium is only needed here (Debian: ``apt-get install chromium``), never by the library,
the tests or CI. The merge example trains two tiny ViTs on disjoint halves of scikit-learn's
digits (8 epochs, cached by the zoo like ``mudsc-fx demo``) and merges them with mudsc_zip
(about 1.5 CPU-minutes; ``--merge-only`` makes just that).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torchvision

import mudsc_fx as mf
from mudsc_fx import views

ROOT = Path(__file__).resolve().parents[2]
IMG = ROOT / "docs" / "img"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--force-device-scale-factor=1"]


def graph(name: str, shape: tuple[int, ...]):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mf.infer(torchvision.models.get_model(name, weights=None).eval(), torch.randn(shape))


def merged_vits():
    """Two tiny ViTs trained on disjoint halves of digits, merged with mudsc_zip."""
    from mudsc_fx import zoo
    ds = zoo.load_dataset("digits")
    task_a, task_b = zoo.split_classes(ds.num_classes, 2, seed=0)
    head = zoo.ClassHead(ds.num_classes, seed=0)
    fit_kw = {**zoo.recipe("vit", ds), "epochs": 8}  # a screenshot, not a benchmark: a short schedule
    models = []
    for i, classes in enumerate((task_a, task_b)):
        key = {"demo": 1, "dataset": "digits", "arch": "vit", "kw": {}, "classes": list(classes), "seed": i + 1,
               **fit_kw}
        models.append(zoo.train_cached(
            key, lambda i=i: zoo.build("vit", ds, seed=i + 1),
            fit=lambda m, c=classes, i=i: zoo.train(m, head, ds.x_train, ds.y_train, c, seed=i + 1, **fit_kw)).eval())
    calib = zoo.calibration_batches(ds.x_train, batch_size=256, max_batches=4, shuffle=True, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mf.Merger(models, calib).merge("mudsc_zip")


def shoot(html: Path, png: Path, fragment: str = "", size: str = "1600,900") -> None:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        sys.exit("no chromium on PATH (Debian: apt-get install chromium), or run with --no-shots")
    with tempfile.TemporaryDirectory() as profile:
        cmd = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={png}", f"--window-size={size}",
               "--virtual-time-budget=3000", html.resolve().as_uri() + fragment]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    print(f"wrote {png.relative_to(ROOT)}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-shots", action="store_true", help="only the pictures (no Chromium)")
    p.add_argument("--no-merge", action="store_true", help="skip the merge example (it trains two models)")
    p.add_argument("--merge-only", action="store_true", help="only the merge example")
    args = p.parse_args()
    IMG.mkdir(parents=True, exist_ok=True)
    graphs = {} if args.merge_only else {"resnet18": graph("resnet18", (1, 3, 64, 64)),
                                         "vit_b_16": graph("vit_b_16", (1, 3, 224, 224)),
                                         "swin_b": graph("swin_b", (1, 3, 224, 224))}
    for name, pg in graphs.items():
        out = views.render(pg, IMG / f"inspect_{name}.png", title=f"torchvision {name}")
        print(f"wrote {out.relative_to(ROOT)}")
    res = None if args.no_merge else merged_vits()
    if res is not None:
        out = views.render(res, IMG / "inspect_merge_vit.png", title="two tiny ViTs merged with mudsc_zip")
        print(f"wrote {out.relative_to(ROOT)}")
    if args.no_shots:
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if graphs:
            views.write_html(graphs["resnet18"], tmp / "resnet18.html", title="torchvision resnet18")
            shoot(tmp / "resnet18.html", IMG / "inspect_page_resnet18.png", "#S4")
            views.write_html(graphs["vit_b_16"], tmp / "vit_b_16.html", title="torchvision vit_b_16")
            shoot(tmp / "vit_b_16.html", IMG / "inspect_page_vit_b_16.png",
                  "#param=encoder.layers.encoder_layer_3.self_attention.in_proj_weight&view=full")
        if res is not None:
            views.write_html(res, tmp / "merge.html", title="two tiny ViTs merged with mudsc_zip")
            shoot(tmp / "merge.html", IMG / "inspect_page_merge.png", "#S4&colour=quality")
    return 0


if __name__ == "__main__":
    sys.exit(main())
