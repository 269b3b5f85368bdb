"""The accelerate config files in configs/ parse, and their FSDP / DeepSpeed sections build accelerate's plugins.

(FSDP and DeepSpeed cannot run on this CPU-only machine: accelerate resolves an FSDP config to no
distribution without CUDA, and DeepSpeed needs CUDA; DDP runs on CPU over gloo, see test_distill.py.)"""
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name,kind", [("ddp", DistributedType.MULTI_GPU), ("ddp_cpu", DistributedType.MULTI_CPU),
                                       ("fsdp", DistributedType.FSDP), ("deepspeed_zero2", DistributedType.DEEPSPEED),
                                       ("deepspeed_zero3", DistributedType.DEEPSPEED)])
def test_accelerate_config_parses_and_builds_its_plugin(name, kind):
    cfg = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    assert cfg.distributed_type == kind and cfg.num_processes >= 2 and cfg.mixed_precision == "no"
    if kind == DistributedType.FSDP:
        f = cfg.fsdp_config
        plugin = FullyShardedDataParallelPlugin(fsdp_version=f["fsdp_version"], auto_wrap_policy=f["fsdp_auto_wrap_policy"].lower(),
                                                reshard_after_forward=f["fsdp_reshard_after_forward"],
                                                state_dict_type=f["fsdp_state_dict_type"])
        assert plugin.fsdp_version == 2
    if kind == DistributedType.DEEPSPEED:
        ds = cfg.deepspeed_config
        plugin = DeepSpeedPlugin(zero_stage=ds["zero_stage"], gradient_clipping=ds["gradient_clipping"],
                                 zero3_init_flag=ds["zero3_init_flag"])
        assert plugin.zero_stage == int(name[-1])
