"""machine_info reads the CPU from /proc/cpuinfo's fields, not from a name."""

from dna_jax import machine_info

CPUINFO = """processor	: 0
vendor_id	: AuthenticAMD
cpu family	: 25
model		: {model}
model name	: AMD EPYC
flags		: fpu sse2 avx2 {extra} hypervisor

processor	: 1
vendor_id	: AuthenticAMD
cpu family	: 25
model		: {model}
model name	: AMD EPYC
flags		: fpu sse2 avx2 {extra} hypervisor
"""


def test_zen3_and_zen4_are_told_apart_by_family_model_and_flags(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO.format(model=1, extra=""))
    info = machine_info.cpu_description(str(path))
    assert (info["family"], info["model"], info["avx512"], info["hypervisor"]) == (
        "25", "1", False, True)
    assert info["microarchitecture"].startswith("Zen 3")
    assert "Zen 3" in machine_info.cpu_summary(str(path))
    assert "no AVX-512" in machine_info.cpu_summary(str(path))
    path.write_text(CPUINFO.format(model=17, extra="avx512f avx512bw"))
    info = machine_info.cpu_description(str(path))
    assert info["avx512"] and info["microarchitecture"].startswith("Zen 4")
    assert machine_info.cpu_summary(str(path)).endswith("AVX-512)")
    assert machine_info.cpu_description(str(tmp_path / "missing"))["cpus"] >= 1
