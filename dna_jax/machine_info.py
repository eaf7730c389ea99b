"""What CPU a figure was measured on, read from /proc/cpuinfo (not from what a README says).

The machine behind this project's CPU figures has changed between sessions (the guide once
called it a Zen 4 with AVX-512; /proc/cpuinfo later said AMD family 25 model 1, a Zen 3
without AVX-512), so every result file records what the kernel reports: the model name,
family and model numbers, whether AVX-512 is there, the CPU count.
"""

from __future__ import annotations

import os
import platform

# (cpu family, model) of AMD parts seen or likely on cloud machines.
AMD_CORES = {("25", "1"): "Zen 3 (EPYC Milan)", ("25", "17"): "Zen 4 (EPYC Genoa)",
             ("25", "160"): "Zen 4c (EPYC Bergamo)", ("23", "49"): "Zen 2 (EPYC Rome)",
             ("26", "2"): "Zen 5 (EPYC Turin)"}


def _first_cpu(path: str = "/proc/cpuinfo") -> dict[str, str]:
    with open(path, encoding="utf-8") as f:
        block = f.read().split("\n\n")[0]
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in block.splitlines()
                                              if ":" in line)}


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` knows."""
    try:
        return _first_cpu().get("model name") or platform.processor() or platform.machine()
    except OSError:
        return platform.processor() or platform.machine()


def cpu_description(path: str = "/proc/cpuinfo") -> dict:
    """{'model_name', 'cpus', 'platform', 'family', 'model', 'avx512', 'hypervisor',
    'microarchitecture'} as far as /proc/cpuinfo tells."""
    info = {"model_name": cpu_model(), "cpus": os.cpu_count(), "platform": platform.platform()}
    try:
        fields = _first_cpu(path)
    except OSError:
        return info
    flags = fields.get("flags", "").split()
    family, model = fields.get("cpu family"), fields.get("model")
    info.update(family=family, model=model, avx512="avx512f" in flags,
                hypervisor="hypervisor" in flags,
                microarchitecture=AMD_CORES.get((family, model), "unknown"))
    return info


def cpu_summary(path: str = "/proc/cpuinfo") -> str:
    """One line, e.g. 'AMD EPYC x2 (family 25 model 1, Zen 3 (EPYC Milan), no AVX-512)'."""
    info = cpu_description(path)
    if info.get("family") is None:
        return f"{info['model_name']} x{info['cpus']}"
    arch = info["microarchitecture"]
    return (f"{info['model_name']} x{info['cpus']} (family {info['family']} model "
            f"{info['model']}{'' if arch == 'unknown' else ', ' + arch}, "
            f"{'AVX-512' if info['avx512'] else 'no AVX-512'})")
