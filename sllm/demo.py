"""`sllm demo`: the main job on the embedded default, offline.

Builds a small demo model (random weights, a tokenizer trained on the spot),
converts it into the loading-optimized format, loads it cold and from the
host pool, checks it against transformers' own loader and generates a few
tokens, printing each step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from sllm.native_loader import HostPool, convert, load_model, load_with_info
from sllm.tiny_models import build_tiny_model, reference_logits


def run(workdir: Path, echo: Callable[[str], None]) -> None:
    """Run the demo in `workdir` (recreated)."""
    import shutil

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    src = build_tiny_model("llama", workdir / "hf-model", seed=7)
    size = sum(p.stat().st_size for p in src.iterdir())
    echo(f"1. built a demo Llama model (random weights, trained tokenizer) in {src} ({size} bytes)")

    dst = workdir / "model.sllm"
    manifest = convert(src, dst)
    echo(
        f"2. converted it to {dst}: {len(manifest.tensors)} tensors in "
        f"{len(manifest.partitions)} partition(s) of {manifest.total_bytes} bytes, "
        f"chunk CRC32C checksums, kept {', '.join(manifest.files)}"
    )

    pool = HostPool(64 * 1024 * 1024)
    t0 = time.perf_counter()
    cold = load_with_info(dst, pool=pool)
    t1 = time.perf_counter()
    warm = load_with_info(dst, pool=pool)
    t2 = time.perf_counter()
    direct = "O_DIRECT" if cold.stats and all(cold.stats.direct) else "buffered reads"
    echo(
        f"3. loaded it: cold from disk in {(t1 - t0) * 1e3:.2f} ms ({direct}, verified), "
        f"again from the host pool in {(t2 - t1) * 1e3:.3f} ms (hit={warm.hit})"
    )

    model = load_model(dst, pool=pool)
    tokenizer = AutoTokenizer.from_pretrained(dst)
    ids = tokenizer("The quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        same = torch.equal(model(input_ids=ids).logits, reference_logits(src, ids))
    echo(
        f"4. built the transformers model from it without random init; logits identical to "
        f"from_pretrained: {'yes' if same else 'NO'}"
    )

    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    text = tokenizer.decode(out[0, ids.shape[1] :])
    echo(f"5. greedy generation of 12 tokens (random weights, so gibberish): {text!r}")
    if not same:
        raise SystemExit("demo failed: loaded model differs from transformers' own loader")
    _serve(workdir, src, echo)


def _serve(workdir: Path, src: Path, echo: Callable[[str], None]) -> None:
    """Publish the model to the local store and run it through an invoker, tier by tier."""
    from sllm.invoker import Invoker, InvokerConfig
    from sllm.store import open_store, push_model

    store_uri = (workdir / "store").as_uri()
    pushed = push_model(str(src), "demo", open_store(store_uri), progress=False)
    again = push_model(str(src), "demo", open_store(store_uri), progress=False)
    echo(
        f"6. pushed it to {store_uri} as 'demo' (digest {pushed.model.digest[:12]}, "
        f"{pushed.bytes_uploaded} bytes); pushing the same content again uploaded "
        f"{again.bytes_uploaded} bytes"
    )
    config = InvokerConfig(
        token="demo", cache_dir=workdir / "invoker", store_uri=store_uri, measure_bandwidth=False
    )
    invoker = Invoker(config)
    invoker.start()
    request = {
        "function": "demo/hello",
        "model": "demo",
        "prompt": "The quick brown fox",
        "max_tokens": 8,
        "temperature": 0,
    }
    for step, prepare in (
        ("7. cold start from the store", None),
        ("8. warm (instance on the device)", None),
        ("9. after unloading, from DRAM", "unload"),
        ("10. after evicting DRAM, from NVMe", "evict"),
    ):
        if prepare is not None:
            invoker.instances.unload("demo/hello")
        if prepare == "evict":
            invoker.evict({"model": "demo", "tier": "dram"})
        report, events = invoker.invoke(request)
        pieces, done = [], {}
        for ev in events:
            if ev["event"] == "token":
                pieces.append(ev["text"])
            elif ev["event"] == "done":
                done = ev
        echo(
            f"{step}: tier={report.tier} ttft={done['timing']['ttft_s'] * 1e3:.1f} ms, "
            f"streamed {done['usage']['completion_tokens']} tokens: {''.join(pieces)!r}"
        )
    invoker.close()
