"""Per-process choices resolved from the config: device, precision, compile, loader, logging."""

import importlib.util
from dataclasses import dataclass

import torch

from fasthvae.data import DEFAULT_LOADER
from fasthvae.ops import onednn_conv
from fasthvae.training.allocator import keep_freed_memory
from fasthvae.training.config import TrainConfig, TrainingError
from fasthvae.training.distributed import DistInfo
from fasthvae.training.precision import choose_amp_dtype


@dataclass(frozen=True)
class Runtime:
    """What this process runs with (the defaults were picked by measurement: see the README)."""

    device: torch.device
    amp_dtype: torch.dtype | None
    amp_fallback: str | None  # why --amp trains in fp32 here (a CPU without native bf16/fp16)
    compile: bool
    compile_wrapper: str  # Inductor's python or cpp wrapper, where compile is on
    fused_optimizer: bool
    channels_last: bool
    onednn_conv: bool
    freed_memory_kept: bool  # glibc keeps freed memory for reuse (fasthvae.training.allocator)
    loader: str
    tensorboard: bool
    log_every: int

    def record(self, world_size: int) -> dict:
        """For config.json and summary.json."""
        return {
            "device": str(self.device),
            "compile": self.compile,
            "compile_wrapper": self.compile_wrapper,
            "amp_dtype": str(self.amp_dtype),
            "amp_fallback": self.amp_fallback,
            "channels_last": self.channels_last,
            "fused_optimizer": self.fused_optimizer,
            "onednn_conv": self.onednn_conv,
            "freed_memory_kept": self.freed_memory_kept,
            "loader": self.loader,
            "tensorboard": self.tensorboard,
            "log_every": self.log_every,
            "world_size": world_size,
        }


def device_type(config: TrainConfig) -> str:
    """``cuda`` or ``cpu``: --device, else CUDA when torch sees a GPU."""
    name = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda was asked for but torch sees no GPU")
    return name


def tensorboard_installed() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def onednn_conv_unavailable(config: TrainConfig, device: torch.device) -> str | None:
    """Why ``--onednn-conv`` cannot run here, or None when it can."""
    if config.model != "deep":
        return f"only the deep model's convolutions have it, not the {config.model} model's"
    if device.type != "cpu":
        return "it runs on CPU only"
    reason = onednn_conv.missing()
    return None if reason is None else f"the op cannot be built: {reason}"


def default_compile_wrapper(device: torch.device) -> str:
    """Inductor's C++ wrapper on CPU, where it shortens the deep step by 3-7% on AMX code, by 5% on an
    AVX2-only CPU and by up to 3% on a capped CPU's AVX2 code (results/bench); its Python wrapper on
    CUDA, where the C++ one has not run."""
    return "python" if device.type == "cuda" else "cpp"


def resolve_runtime(config: TrainConfig, dist: DistInfo) -> Runtime:
    name = device_type(config)
    device = torch.device("cuda", dist.local_rank) if name == "cuda" else torch.device("cpu")
    on_gpu = device.type == "cuda"

    def pick(value: bool | None, default: bool) -> bool:
        return default if value is None else value

    if config.tensorboard and not tensorboard_installed():
        raise TrainingError("--tensorboard needs the tensorboard package: pip install tensorboard")
    amp_dtype, amp_fallback = choose_amp_dtype(config.amp, config.amp_dtype, device)
    onednn_reason = onednn_conv_unavailable(config, device)
    if config.onednn_conv and onednn_reason:
        raise TrainingError(f"--onednn-conv: {onednn_reason}")
    return Runtime(
        device=device,
        amp_dtype=amp_dtype,
        amp_fallback=amp_fallback,
        compile=pick(config.compile, True),
        compile_wrapper=config.compile_wrapper or default_compile_wrapper(device),
        fused_optimizer=pick(config.fused_optimizer, True),
        channels_last=pick(config.channels_last, True),
        onednn_conv=pick(config.onednn_conv, onednn_reason is None),
        freed_memory_kept=config.keep_freed_memory and keep_freed_memory(),
        loader=config.loader or DEFAULT_LOADER,
        tensorboard=pick(config.tensorboard, tensorboard_installed()),
        log_every=config.log_every or (25 if on_gpu else 1),
    )
