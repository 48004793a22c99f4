"""Where the sandbox's CPU and memory figures come from: cgroup v1, v2, or the host."""

from __future__ import annotations

from pathlib import Path

from opensandbox_platform.execd import metrics


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_cgroup_paths() -> None:
    text = "12:memory:/pod/abc\n4:cpu,cpuacct:/pod/abc\n1:name=systemd:/\n0::/unified/x\n"
    paths = metrics.cgroup_paths(text)
    assert paths["memory"] == paths["cpu"] == paths["cpuacct"] == "/pod/abc"
    assert paths[""] == "/unified/x" and paths["systemd"] == "/"


def test_host_memory() -> None:
    total, used = metrics.host_memory("MemTotal: 1000 kB\nMemFree: 100 kB\nMemAvailable: 400 kB\n")
    assert (total, used) == (1000 * 1024, 600 * 1024)


def test_cgroup_v1_limit_quota_and_usage_without_page_cache(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "memory/memory.usage_in_bytes": str(300 << 20),
            "memory/memory.limit_in_bytes": str(512 << 20),
            "memory/memory.stat": f"cache 1\ntotal_inactive_file {100 << 20}\n",
            "cpu/cpu.cfs_quota_us": "50000",
            "cpu/cpu.cfs_period_us": "100000",
            "cpuacct/cpuacct.usage": "123456789",
        },
    )
    sampler = metrics.Sampler(metrics.Sources.detect(str(tmp_path)))
    assert sampler.sources.kind == "v1"
    total, used = sampler.memory()
    assert (total, used) == (512 << 20, 200 << 20)
    assert sampler.cpu_count() == 0.5
    assert sampler.cpu_usage_ns() == 123456789


def test_cgroup_v1_unlimited_falls_back_to_host_memory_and_cpus(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "memory/memory.usage_in_bytes": str(10 << 20),
            "memory/memory.limit_in_bytes": "9223372036854771712",
            "memory/memory.stat": "total_inactive_file 0\n",
            "cpu/cpu.cfs_quota_us": "-1",
            "cpu/cpu.cfs_period_us": "100000",
            "cpuacct/cpuacct.usage": "1",
        },
    )
    sampler = metrics.Sampler(metrics.Sources.detect(str(tmp_path)))
    host_total, _ = metrics.host_memory(Path("/proc/meminfo").read_text())
    assert sampler.memory() == (host_total, 10 << 20)
    assert sampler.cpu_count() >= 1


def test_cgroup_v2(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "cgroup.controllers": "cpu memory",
            "memory.current": str(64 << 20),
            "memory.max": str(256 << 20),
            "memory.stat": f"anon 1\ninactive_file {16 << 20}\n",
            "cpu.max": "200000 100000",
            "cpu.stat": "usage_usec 42\nuser_usec 40\n",
        },
    )
    sampler = metrics.Sampler(metrics.Sources.detect(str(tmp_path)))
    assert sampler.sources.kind == "v2"
    assert sampler.memory() == (256 << 20, 48 << 20)
    assert sampler.cpu_count() == min(2.0, sampler.cpu_count())
    assert sampler.cpu_usage_ns() == 42_000


def test_no_cgroup_means_host_figures(tmp_path: Path) -> None:
    sampler = metrics.Sampler(metrics.Sources.detect(str(tmp_path / "absent")))
    assert sampler.sources.kind == "host"
    total, used = sampler.memory()
    assert 0 < used <= total
    assert sampler.cpu_usage_ns() > 0


async def test_sample_shape_and_bounds() -> None:
    sample = await metrics.Sampler().sample()
    assert set(sample) == {"cpu_count", "cpu_used_pct", "mem_total_mib", "mem_used_mib", "timestamp"}
    assert 0 <= sample["cpu_used_pct"] <= 100
    assert 0 < sample["mem_used_mib"] <= sample["mem_total_mib"]
