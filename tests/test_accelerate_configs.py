"""configs/accelerate/*.yaml go through accelerate's own parsing: ClusterConfig (unknown top-level
keys raise), the `accelerate launch` argument resolution (nested fsdp_/deepspeed_ keys must be
launcher options, else they would be silently ignored), the environment the launcher exports, and
for FSDP2 the FullyShardedDataParallelPlugin built from that environment."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs" / "accelerate"

# name -> (distributed type, processes, machines)
EXPECTED = {
    "single_gpu": (DistributedType.NO, 1, 1),
    "ddp": (DistributedType.MULTI_GPU, 8, 1),
    "fsdp2": (DistributedType.FSDP, 8, 1),
    "fsdp2_full_state_dict": (DistributedType.FSDP, 8, 1),
    "deepspeed_zero1": (DistributedType.DEEPSPEED, 8, 1),
    "deepspeed_zero2": (DistributedType.DEEPSPEED, 8, 1),
    "deepspeed_zero3": (DistributedType.DEEPSPEED, 8, 1),
    "multi_node_example": (DistributedType.DEEPSPEED, 16, 2),
}


def _config_path(name: str) -> Path:
    return CONFIG_DIR / f"{name}.yaml"


def _launch_args(path: Path, *extra: str):
    """What `accelerate launch --config_file PATH ... -m openllama.cli pretrain` resolves to."""
    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(path), *extra, "-m", "openllama.cli", "pretrain"])
    args, defaults, _ = _validate_launch_command(args)
    # set by launch_command() right before deepspeed_launcher()
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
    return parser, args


def test_every_config_is_listed():
    assert sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_with_accelerate(name):
    path = _config_path(name)
    cfg = load_config_from_file(str(path))
    assert isinstance(cfg, ClusterConfig)
    dist, processes, machines = EXPECTED[name]
    assert (cfg.distributed_type, cfg.num_processes, cfg.num_machines) == (dist, processes, machines)
    assert cfg.mixed_precision == "bf16"
    if machines > 1:
        assert cfg.main_process_ip and cfg.main_process_port


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_nested_keys_are_launcher_options(name):
    """accelerate copies fsdp_config/deepspeed_config entries onto the launch namespace with
    setattr, so a misspelt key would be dropped without a word: each must be a launcher option."""
    parser, _ = _launch_args(_config_path(name), *(["--machine_rank", "1"] if "multi" in name else []))
    options = {action.dest for action in parser._actions}
    raw = yaml.safe_load(_config_path(name).read_text())
    for section in ("fsdp_config", "deepspeed_config"):
        for key in raw.get(section) or {}:
            assert key in options, f"{name}.yaml: {section}.{key} is not an accelerate launch option"


def test_a_misspelt_key_is_caught(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(_config_path("ddp").read_text() + "num_proceses: 4\n")
    with pytest.raises(ValueError, match="unknown keys"):
        load_config_from_file(str(bad))


@pytest.mark.parametrize("name,state_dict_type", [("fsdp2", "SHARDED_STATE_DICT"),
                                                  ("fsdp2_full_state_dict", "FULL_STATE_DICT")])
def test_fsdp2_plugin_from_launcher_env(name, state_dict_type, monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import StateDictType

    from openllama.config import ModelConfig
    from openllama.model import Block, Llama

    _, args = _launch_args(_config_path(name))
    assert args.use_fsdp and not args.multi_gpu
    env = prepare_multi_gpu_env(args)
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True
    assert plugin.state_dict_type == StateDictType[state_dict_type]
    assert plugin.cpu_ram_efficient_loading is False
    assert plugin.transformer_cls_names_to_wrap == [Block.__name__]
    # the class name must resolve inside our model, or accelerate raises here
    plugin.set_auto_wrap_policy(Llama(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, max_seq_len=16)))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_env(stage):
    _, args = _launch_args(_config_path(f"deepspeed_zero{stage}"))
    assert args.use_deepspeed
    cmd, env = prepare_deepspeed_cmd_env(args)
    assert cmd is None  # one node: accelerate runs torchrun itself
    assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == str(stage)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    # the training config, not the launcher config, owns accumulation and clipping
    assert "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" not in env
    assert "ACCELERATE_GRADIENT_CLIPPING" not in env


def test_multi_node_rendezvous_second_node():
    _, args = _launch_args(_config_path("multi_node_example"), "--machine_rank", "1")
    cmd, _ = prepare_deepspeed_cmd_env(args)
    assert cmd is None  # "standard" launcher: torchrun on each node, no pdsh/hostfile
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("2", "8", 1)
    assert args.rdzv_endpoint == "10.0.0.1:29500"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PROBE = r"""
import os, torch
from accelerate import Accelerator
from openllama.config import ModelConfig
from openllama.model import Llama
acc = Accelerator(cpu=not torch.cuda.is_available())
cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, max_seq_len=16, tie_embeddings=True)
torch.manual_seed(0)
model = Llama(cfg)
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
model, opt = acc.prepare(model, opt)
x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(acc.process_index))
loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
acc.backward(loss)
opt.step()
w = acc.unwrap_model(model).layers[0].attention.wq.weight.detach()
same = acc.gather(w.sum().reshape(1))
print(f"RESULT rank={acc.process_index} world={acc.num_processes} type={acc.distributed_type.value} "
      f"wrapped={type(model).__name__} replicas_equal={bool((same == same[0]).all())}", flush=True)
"""


@pytest.mark.slow
def test_ddp_config_launches_two_gloo_processes_on_cpu(tmp_path):
    """`accelerate launch --config_file ddp.yaml --num_processes 2` on a CPU box: two processes in
    one gloo group, DDP-wrapped, replicas equal after a step on different data."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(_config_path("ddp")),
           "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(_free_port()), str(script)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    # the two ranks share one stdout pipe, so their lines may interleave: find each record by pattern
    results = sorted(re.findall(r"RESULT rank=\d+ .*?replicas_equal=(?:True|False)", out.stdout))
    assert out.returncode == 0, out.stderr[-3000:]
    assert results == [
        f"RESULT rank={r} world=2 type=MULTI_CPU wrapped=DistributedDataParallel replicas_equal=True" for r in (0, 1)
    ]
