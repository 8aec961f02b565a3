"""Training that never holds the full model on one rank: sharded from birth (the same initial weights
at every world size), sharded DCP checkpoints that resume at another world size, export that streams
tensor by tensor, and two "nodes" on this machine. Multi-process runs use torchrun with gloo."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from test_distributed import event, pretrain, train_records
from test_engine import learnable_docs, tiny_config
from test_packing import write_token_shards

from openllama.config import ModelConfig
from openllama.model import Llama, StoredWeights, save_model

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def torchrun(n: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)]


# A vocabulary of 600 rows is drawn in three 256-row blocks, which 2 and 4 ranks cut across
# (and 4 ranks unevenly: 150 rows each): the sharded init must not care where the cuts are.
INIT_CFG = dict(vocab_size=600, dim=64, n_layers=2, n_heads=4, multiple_of=16, max_seq_len=32, tie_embeddings=True)

INIT_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from openllama.config import ModelConfig
    from openllama.model import Llama
    from openllama.train.distributed import materialize, shard_model

    dist.init_process_group("gloo")
    with torch.device("meta"):
        model = Llama(ModelConfig(**{cfg}))
    shard_model(model, torch.device("cpu"), "no")
    materialize(model, torch.device("cpu"), seed=7)
    local = sum(p.to_local().numel() for p in model.parameters())
    # gathered here only to compare (the trainer never gathers)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        torch.save({{"state": full, "local_numel": local}}, sys.argv[1])
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_initial_weights_do_not_depend_on_the_world_size(tmp_path):
    script = tmp_path / "init.py"
    script.write_text(INIT_SCRIPT.format(cfg=INIT_CFG))
    with torch.device("meta"):  # built on meta, then filled as the trainer does on one process
        reference = Llama(ModelConfig(**INIT_CFG))
    reference.to_empty(device="cpu")
    reference.tie_weights()
    reference.init_weights(7)
    expected = reference.state_dict()
    total = sum(p.numel() for p in reference.parameters())
    for world in (1, 2, 4):
        out = tmp_path / f"w{world}.pt"
        proc = subprocess.run([*torchrun(world), str(script), str(out)], env=ENV, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        got = torch.load(out)
        assert got["state"].keys() == expected.keys()
        for name, tensor in expected.items():
            assert torch.equal(got["state"][name], tensor), (world, name)
        # rank 0 materialised its shard only: about 1/world of the parameters (rows round up)
        assert got["local_numel"] <= total / world * 1.1 + 64 * 4
    # and the model a single process builds directly, from the same seed
    direct = Llama(ModelConfig(**INIT_CFG))
    direct.init_weights(7)
    assert all(torch.equal(direct.state_dict()[n], t) for n, t in expected.items())


@pytest.fixture(scope="module")
def four_rank_config(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("reshard")
    tokens = write_token_shards(root / "tokens", learnable_docs(300), vocab_size=64)
    cfg = tiny_config(tokens, max_steps=8, save_every=2, eval_every=4, keep_last=8, micro_batch_size=2)
    cfg["model"]["tie_embeddings"] = True
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return root, config


@pytest.mark.slow
def test_sharded_checkpoint_reshards_4_to_2_to_1_to_2(four_rank_config):
    # the global batch stays 8 sequences: 4 ranks x 2, 2 ranks x 2 x 2 accumulation, 1 x 2 x 4
    root, config = four_rank_config
    whole = root / "whole"
    pretrain(config, whole, torchrun(4), "train.strategy=fsdp2")
    run = root / "chain"
    pretrain(config, run, torchrun(4), "train.strategy=fsdp2", "train.halt_at_step=2")
    assert (run / "checkpoints" / "step_0000002" / "state" / "dcp" / "__3_0.distcp").is_file()
    pretrain(config, run, torchrun(2), "--resume", "train.grad_accum_steps=2", "train.halt_at_step=4")
    assert event(run, "resume")["world"] == 2
    pretrain(config, run, [sys.executable], "--resume", "train.grad_accum_steps=4", "train.halt_at_step=6")
    assert event(run, "resume")["world"] == 1
    pretrain(config, run, torchrun(2), "--resume", "train.grad_accum_steps=2")
    resumed = event(run, "resume")
    assert resumed["world"] == 2 and resumed["step"] == 6 and resumed["strategy"] == "fsdp2"
    # losses and final weights as the uninterrupted 4-rank run, within 1e-5 (sums in another order)
    ra, rb = train_records(whole), train_records(run)
    assert [r["step"] for r in rb] == list(range(1, 9))
    for x, y in zip(ra, rb):
        assert abs(x["loss"] - y["loss"]) < 1e-5, (x["step"], x["loss"], y["loss"])
    a, b = (StoredWeights(r / "checkpoints" / "step_0000008" / "model") for r in (whole, run))
    for name in a.names():
        torch.testing.assert_close(a.get(name), b.get(name), atol=1e-5, rtol=0, msg=name)


@pytest.mark.slow
def test_async_save_writes_the_same_checkpoint_and_resumes_bitwise(four_rank_config):
    root, config = four_rank_config
    sync, asyn = root / "sync2", root / "async2"
    pretrain(config, sync, torchrun(2), "train.strategy=fsdp2", "train.grad_accum_steps=2", "train.max_steps=4")
    pretrain(config, asyn, torchrun(2), "train.strategy=fsdp2", "train.grad_accum_steps=2", "train.max_steps=4",
             "train.async_save=true", "train.halt_at_step=2")
    pretrain(config, asyn, torchrun(2), "--resume", "train.async_save=true", "train.max_steps=4")
    # every async checkpoint was published (COMPLETE, latest) and equals the synchronous one, bitwise
    assert (asyn / "checkpoints" / "latest").read_text().strip() == "step_0000004"
    assert [r["loss"] for r in train_records(sync)] == [r["loss"] for r in train_records(asyn)]
    for step in (2, 4):
        a, b = (StoredWeights(r / "checkpoints" / f"step_{step:07d}" / "model") for r in (sync, asyn))
        assert all(torch.equal(a.get(n), b.get(n)) for n in a.names())


@pytest.mark.slow
def test_init_from_a_sharded_checkpoint_on_one_process(four_rank_config):
    # continued pretraining from a 2-rank run's DCP checkpoint, by one process: lr ~0, so the
    # weights it saves after one step are the ones it started from
    root, config = four_rank_config
    source = root / "source2"
    pretrain(config, source, torchrun(2), "train.strategy=fsdp2", "train.grad_accum_steps=2", "train.max_steps=2")
    start = source / "checkpoints" / "step_0000002"
    run = root / "continued"
    pretrain(config, run, [sys.executable], f"init={start}", "train.max_steps=1", "train.grad_accum_steps=4",
             "optim.lr=1e-12", "optim.warmup_steps=0")
    a, b = StoredWeights(start / "model"), StoredWeights(run / "checkpoints" / "step_0000001" / "model")
    for name in a.names():
        torch.testing.assert_close(a.get(name), b.get(name), atol=1e-9, rtol=0, msg=name)


def _peak_rise_mb(setup: str, work: str) -> float:
    """How far the resident memory of a fresh interpreter rises above where `setup` left it while
    `work` runs (Linux: the high-water mark is reset between them through /proc/self/clear_refs)."""
    probe = textwrap.dedent(f"""
        {setup}
        def status(key):
            return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":"))
        import gc; gc.collect()
        before = status("VmRSS")
        open("/proc/self/clear_refs", "w").write("5")
        {work}
        print((status("VmHWM") - before) / 1024)
    """)
    proc = subprocess.run([sys.executable, "-c", probe], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return float(proc.stdout.strip().splitlines()[-1])


def test_export_streams_tensor_by_tensor(tmp_path):
    # ~50M parameters (200 MB in float32) in tensors of at most 32 MB: export must stay near one tensor
    cfg = ModelConfig(vocab_size=8192, dim=1024, n_layers=3, n_heads=8, max_seq_len=64, stable_embedding=True,
                      tie_embeddings=True)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Llama(cfg)
    model.to_empty(device="cpu")
    model.tie_weights()
    model.init_weights(0)
    save_model(model, tmp_path / "m")
    model_mb = sum(p.numel() * 4 for p in model.parameters()) / 2**20
    largest_mb = max(p.numel() * 4 for p in model.parameters()) / 2**20
    del model
    imports = "import torch, safetensors.torch, transformers; from openllama import hf, model"
    rise = _peak_rise_mb(imports, f"hf.export_hf({str(tmp_path / 'm')!r}, {str(tmp_path / 'hf')!r})")
    # the measurement sees a whole model: loading it rises by about its size
    whole = _peak_rise_mb(imports, f"m = model.load_model({str(tmp_path / 'm')!r}); [p.sum() for p in m.parameters()]")
    assert whole > 0.8 * model_mb, (whole, model_mb)
    # the exported tensors equal the in-memory conversion (LayerNorm folded into the embedding rows)
    from safetensors.torch import load_file

    from openllama.hf import to_hf_state_dict
    from openllama.model import load_model

    expected = to_hf_state_dict(load_model(tmp_path / "m"))
    written = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in expected)
    # streaming: about the largest tensor (read + converted copy), far from the model
    assert rise < 3 * largest_mb + 16 and rise < 0.6 * model_mb, (rise, largest_mb, model_mb)
