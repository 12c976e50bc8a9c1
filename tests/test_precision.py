"""--amp on CPUs: autocast only where the CPU has native arithmetic in that type, fp32 otherwise."""

import pytest
import torch

from fasthvae import hardware
from fasthvae.hardware import cpu_flags, usable_cpu_flags
from fasthvae.training.precision import choose_amp_dtype

CPU = torch.device("cpu")
AVX2_LAPTOP = {"sse2", "avx", "avx2", "fma", "f16c"}
ZEN4 = AVX2_LAPTOP | {"avx512f", "avx512_bf16"}
SAPPHIRE_RAPIDS = AVX2_LAPTOP | {"avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile"}


def test_no_amp_is_fp32():
    assert choose_amp_dtype(False, "bf16", CPU, AVX2_LAPTOP) == (None, None)


def test_avx2_only_cpu_falls_back_to_fp32_with_a_warning():
    for requested in ("bf16", "fp16"):
        with pytest.warns(UserWarning, match="no native"):
            dtype, why = choose_amp_dtype(True, requested, CPU, AVX2_LAPTOP)
        assert dtype is None and "trains in fp32" in why


def test_native_bf16_cpus_autocast():
    assert choose_amp_dtype(True, "bf16", CPU, ZEN4) == (torch.bfloat16, None)
    assert choose_amp_dtype(True, "bf16", CPU, {"bf16", "asimd"}) == (torch.bfloat16, None)  # Arm
    assert choose_amp_dtype(True, "fp16", CPU, SAPPHIRE_RAPIDS) == (torch.float16, None)
    with pytest.warns(UserWarning, match="fp16"):
        assert choose_amp_dtype(True, "fp16", CPU, ZEN4)[0] is None  # bf16 but no fp16 units


def test_bad_dtype_is_named():
    with pytest.raises(ValueError, match="--amp-dtype"):
        choose_amp_dtype(True, "fp8", CPU, ZEN4)


def test_cpu_flags_reads_x86_and_arm_cpuinfo(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 avx512_bf16\n\n")
    assert cpu_flags(x86) == {"fpu", "avx2", "avx512_bf16"}
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert cpu_flags(arm) == {"fp", "asimd", "bf16"}
    assert cpu_flags(tmp_path / "missing") == set()


def test_an_isa_cap_leaves_out_the_flags_above_it():
    assert usable_cpu_flags(SAPPHIRE_RAPIDS, "avx2") == AVX2_LAPTOP
    assert usable_cpu_flags(SAPPHIRE_RAPIDS, "AVX2") == AVX2_LAPTOP
    assert usable_cpu_flags(SAPPHIRE_RAPIDS, "default") == {"sse2"}
    for no_cap in ("", "avx512"):
        assert usable_cpu_flags(SAPPHIRE_RAPIDS, no_cap) == SAPPHIRE_RAPIDS


def test_amp_follows_the_isa_cap(monkeypatch):
    """Capped to AVX2 (ATEN_CPU_CAPABILITY), a bf16 CPU computes as an AVX2 one: fp32, said why."""
    monkeypatch.setattr(hardware, "cpu_flags", lambda: ZEN4)
    monkeypatch.delenv(hardware.ISA_CAP_ENV, raising=False)
    assert choose_amp_dtype(True, "bf16", CPU) == (torch.bfloat16, None)
    monkeypatch.setenv(hardware.ISA_CAP_ENV, "avx2")
    with pytest.warns(UserWarning, match="ATEN_CPU_CAPABILITY=avx2"):
        assert choose_amp_dtype(True, "bf16", CPU)[0] is None
