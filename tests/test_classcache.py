"""The driver JVM's class-data archive (dist_train.launchers.spark.classcache)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dist_train.launchers.spark import classcache

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def fake_install(tmp_path: Path, version: str = "17.0.15") -> dict:
    """A JDK (bin/java and its release file) and a Spark home with jars: what the archive is keyed by."""
    java = tmp_path / "jdk" / "bin" / "java"
    java.parent.mkdir(parents=True)
    java.write_text("#!/bin/sh\n")
    java.chmod(0o755)
    (tmp_path / "jdk" / "release").write_text(f'IMPLEMENTOR="x"\nJAVA_VERSION="{version}"\n')
    (tmp_path / "spark" / "jars").mkdir(parents=True)
    (tmp_path / "spark" / "jars" / "spark-core.jar").write_bytes(b"jar")
    return {"JAVA_HOME": str(tmp_path / "jdk"), "SPARK_HOME": str(tmp_path / "spark"),
            "XDG_CACHE_HOME": str(tmp_path / "cache"), "PATH": os.environ.get("PATH", "")}


def option(args: list[str]) -> str:
    assert args[0] == "--conf" and args[1].startswith(classcache.KEY + "=")
    return args[1]


def test_the_first_run_writes_the_archive_the_next_ones_read(tmp_path):
    env, lines = fake_install(tmp_path), []
    args, finish = classcache.driver_options([], env, lines.append)
    written = Path(option(args).split("-XX:ArchiveClassesAtExit=")[1])
    assert lines and "class archive" in lines[0] and not written.exists()
    written.write_bytes(b"archive")  # what the JVM writes as it exits
    finish(True)
    archives = list((tmp_path / "cache" / "dist-train").iterdir())
    assert [p.suffix for p in archives] == [".jsa"] and archives[0].read_bytes() == b"archive"
    args, finish = classcache.driver_options([], env, lines.append)
    assert option(args).endswith(f"-XX:SharedArchiveFile={archives[0]}") and len(lines) == 1
    # another Spark (its jars differ): an archive of its own
    (tmp_path / "spark" / "jars" / "extra.jar").write_bytes(b"jar")
    args, _ = classcache.driver_options([], env, lines.append)
    assert "-XX:ArchiveClassesAtExit=" in option(args)


def test_a_jvm_that_did_not_end_by_itself_leaves_no_archive(tmp_path):
    env = fake_install(tmp_path)
    args, finish = classcache.driver_options([], env, lambda line: None)
    written = Path(option(args).split("-XX:ArchiveClassesAtExit=")[1])
    written.write_bytes(b"half")
    finish(False)
    assert list((tmp_path / "cache" / "dist-train").iterdir()) == []
    # a wrapper killed outright leaves its file behind: the next run removes it (its process is gone)
    orphan = tmp_path / "cache" / "dist-train" / "jvm-0123456789abcdef.jsa.999999999.tmp"
    orphan.write_bytes(b"half")
    classcache.driver_options([], env, lambda line: None)
    assert not orphan.exists()


@pytest.mark.parametrize("case", ["off", "cluster", "cluster-conf", "user-options", "defaults-file", "java-11",
                                  "no-java", "unwritable", "space-in-path", "disk-full"])
def test_left_alone_where_it_could_not_help_or_would_override_the_user(tmp_path, case, monkeypatch):
    env, args = fake_install(tmp_path, "11.0.2" if case == "java-11" else "17.0.15"), []
    if case == "off":
        env[classcache.ENV] = "0"
    elif case == "cluster":
        args = ["--deploy-mode", "cluster"]
    elif case == "cluster-conf":
        args = ["--conf", "spark.submit.deployMode=cluster"]
    elif case == "user-options":
        args = ["--conf", "spark.driver.defaultJavaOptions=-Dx=1"]
    elif case == "defaults-file":
        (tmp_path / "spark" / "conf").mkdir()
        (tmp_path / "spark" / "conf" / "spark-defaults.conf").write_text("spark.driver.defaultJavaOptions -Dx=1\n")
    elif case == "no-java":
        env["JAVA_HOME"] = str(tmp_path / "nothing")
    elif case == "unwritable":
        (tmp_path / "cache").write_text("a file, not a folder")
    elif case == "space-in-path":
        env["XDG_CACHE_HOME"] = str(tmp_path / "my cache")
    elif case == "disk-full":
        monkeypatch.setattr(classcache, "ROOM", 1 << 62)
    lines = []
    assert classcache.driver_options(args, env, lines.append)[0] == [] and lines == []


@pytest.mark.slow
@pytest.mark.spark
def test_dist_train_spark_writes_then_reads_the_archive_quietly(tmp_path):
    """For real: the first run's JVM writes the archive as it exits, the second starts from
    it; neither prints a line of the JVM's about it, and nothing half-written stays."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop(classcache.ENV, None)
    cmd = [str(BIN / "dist-train"), "spark", "conf/digits.yaml", "--master", "local[2]",
           "--set", "train.max_steps=3", "--set", "train.log_every=1"]
    outs = []
    for i in range(2):
        p = subprocess.run([*cmd, "--out", str(tmp_path / f"run{i}")], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        outs.append(p.stdout + p.stderr)
        assert [f.suffix for f in (tmp_path / "cache" / "dist-train").iterdir()] == [".jsa"]
    assert "-XX:ArchiveClassesAtExit=" in outs[0] and "writes its class archive" in outs[0]
    assert "-XX:SharedArchiveFile=" in outs[1] and "writes its class archive" not in outs[1]
    for out in outs:
        assert "[cds" not in out and "shared archive" not in out.lower() and "spark: done" in out
