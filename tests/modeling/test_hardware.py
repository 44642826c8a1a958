"""Precision by capability: bf16 is the default only where a device computes it natively, decided per device kind
(CUDA, x86, arm64, anything else) from faked CPU features and CUDA answers."""

import logging

import pytest
import torch

from glade import hardware
from glade.hardware import choose_precision, computable_dtype, native_bf16

# (machine, CPU feature flags, native bf16?)
CPUS = [
    ("x86_64", "fpu sse2 avx avx2 fma", False),  # Zen 3, Haswell-era Xeons and laptops
    ("x86_64", "avx2 avx512f avx512bw avx512_bf16", True),  # Zen 4, Cooper Lake
    ("x86_64", "avx2 avx512f amx_tile amx_bf16", True),  # Sapphire Rapids
    ("x86_64", "avx2 avx512f avx512bw", False),  # Skylake-SP: AVX-512 without its bf16 extension
    ("aarch64", "fp asimd sve bf16 i8mm", True),  # Graviton 3, Neoverse V1
    ("aarch64", "fp asimd atomics", False),  # Graviton 2, Neoverse N1
    ("arm64", "bf16", True),  # macOS names its architecture arm64
    ("riscv64", "bf16", False),  # anything else: no
]


@pytest.fixture
def fake_cuda(monkeypatch):
    def fake(bf16: bool) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "Fake GPU")

    return fake


@pytest.mark.parametrize("machine, flags, native", CPUS)
def test_a_cpu_computes_bf16_natively_only_with_the_instructions_for_it(fake_cpu, machine, flags, native):
    fake_cpu(machine, flags)
    assert native_bf16("cpu") is native
    precision = choose_precision("auto", "cpu")
    assert precision.mixed_precision == ("bf16" if native else "no")
    assert precision.dtype == (torch.bfloat16 if native else torch.float32)
    assert precision.reason.startswith("auto: ")


@pytest.mark.parametrize("bf16", [True, False])
def test_cuda_follows_torch(fake_cpu, fake_cuda, bf16):
    fake_cpu("x86_64", "avx2")  # the host CPU does not matter for a CUDA device
    fake_cuda(bf16)
    assert native_bf16("cuda") is bf16 and native_bf16(torch.device("cuda", 0)) is bf16
    assert choose_precision("auto", "cuda").mixed_precision == ("bf16" if bf16 else "no")


def test_other_devices_have_no_native_bf16(fake_cpu):
    fake_cpu("arm64", "bf16")
    assert not native_bf16("mps") and not native_bf16("meta")
    assert choose_precision("auto", "mps").mixed_precision == "no"


def test_reading_the_real_machine_gives_an_answer():
    assert isinstance(native_bf16("cpu"), bool)
    assert choose_precision("auto").mixed_precision in ("bf16", "no")


def test_explicit_choices_are_honoured_and_emulated_bf16_warns_once(fake_cpu, caplog):
    fake_cpu("x86_64", "avx2")
    hardware.warn_emulated_bf16.cache_clear()
    assert choose_precision("no").mixed_precision == "no"
    with caplog.at_level(logging.WARNING, logger="glade.hardware"):
        first, second = choose_precision("bf16"), choose_precision("bf16")
    assert first.mixed_precision == second.mixed_precision == "bf16"
    assert "emulated and slow" in first.reason and "neither avx512_bf16 nor amx_bf16" in first.reason
    warnings = [record for record in caplog.records if "emulates it" in record.getMessage()]
    assert len(warnings) == 1


def test_native_bf16_asked_for_does_not_warn(fake_cpu, caplog):
    fake_cpu("x86_64", "avx512_bf16")
    hardware.warn_emulated_bf16.cache_clear()
    with caplog.at_level(logging.WARNING, logger="glade.hardware"):
        precision = choose_precision("bf16")
    assert precision.reason == "asked for; this CPU has avx512_bf16" and not caplog.records


def test_an_unknown_choice_is_refused_by_name():
    with pytest.raises(ValueError, match="mixed precision must be one of auto, bf16, no, got 'fp16'"):
        choose_precision("fp16")


@pytest.mark.parametrize("machine, flags, native", CPUS[:2])
def test_bf16_weights_run_in_fp32_where_bf16_would_be_emulated(fake_cpu, machine, flags, native):
    fake_cpu(machine, flags)
    assert computable_dtype(torch.bfloat16, "cpu") == (torch.bfloat16 if native else torch.float32)
    assert computable_dtype(torch.float32, "cpu") == torch.float32
    assert computable_dtype(torch.float16, "cpu") == torch.float16


def test_linux_feature_lines_are_read_for_x86_and_arm(monkeypatch, tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    monkeypatch.setattr(hardware, "CPUINFO", x86)
    assert hardware.cpu_features() == {"fpu", "avx2", "avx512_bf16"}
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\nCPU implementer\t: 0x41\n")
    monkeypatch.setattr(hardware, "CPUINFO", arm)
    assert hardware.cpu_features() == {"fp", "asimd", "bf16"}
