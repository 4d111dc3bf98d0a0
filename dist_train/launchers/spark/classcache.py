"""The driver JVM's class-data archive (Java's AppCDS), kept between `dist-train spark` runs.

A Spark driver loads ~15,000 classes before its first job; Java 13+ can write the ones a
run loaded into an archive at exit (-XX:ArchiveClassesAtExit) and map it into the next
JVM (-XX:SharedArchiveFile) instead of reading, verifying and linking them again. On 2
cores, spark-submit to its first Python task: 7.4 s without it, 4.6 s with it (Spark
4.3, Java 17; docs/performance.md). The first run writes the archive (~160 MB, in
$XDG_CACHE_HOME/dist-train, default ~/.cache/dist-train), and its exit takes ~10 s more.

Only for the JVM `dist-train spark` starts as the driver (client mode, Java 17 or newer,
where no spark.driver.defaultJavaOptions of the user's would be overridden);
DIST_TRAIN_CLASS_ARCHIVE=0 turns it off. The JVM checks the archive against its own
version and class path, and starts without it where they differ. No pyspark import here.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Mapping

from ...files import alive

ENV = "DIST_TRAIN_CLASS_ARCHIVE"
ROOM = 1 << 30  # free bytes the cache needs before a JVM is asked to write an archive (~160 MB) there
KEEP = 2  # archives kept (two Spark or Java installations used in turn do not rewrite each other's)
QUIET = "-XX:+IgnoreUnrecognizedVMOptions -Xlog:cds*=off -Xlog:class+path=off"  # no JVM lines about the archive
KEY = "spark.driver.defaultJavaOptions"  # prepended to the user's spark.driver.extraJavaOptions, which stay theirs


def driver_options(spark_args: list[str], environ: Mapping[str, str], say: Callable[[str], None] = print
                   ) -> tuple[list[str], Callable[[bool], None]]:
    """spark-submit arguments that give the driver JVM the archive (reading it, or writing
    it at exit where there is none yet), and what to call once spark-submit has exited,
    with whether its JVM ended by itself (then the archive it wrote is whole and is put
    in place; a JVM killed mid-write leaves nothing)."""
    unchanged = [], _nothing
    if environ.get(ENV, "1") == "0" or not _client_mode(spark_args) or _user_sets_default_options(spark_args, environ):
        return unchanged
    java, spark_home = _java(environ), _spark_home(environ)
    if java is None or spark_home is None or (_java_major(java) or 0) < 17:
        return unchanged
    try:
        folder = Path(environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dist-train"
    except RuntimeError:  # no home directory to be found
        return unchanged
    if re.search(r"\s", str(folder)):
        return unchanged  # Spark splits the option string on white space
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _remove_orphans(folder)
        room = shutil.disk_usage(folder).free
    except OSError:
        return unchanged  # no writable cache: start as Spark does
    archive = folder / f"jvm-{_key(java, spark_home)}.jsa"
    if archive.is_file():
        return ["--conf", f"{KEY}={QUIET} -XX:SharedArchiveFile={archive}"], _nothing
    if room < ROOM:
        return unchanged  # a JVM that cannot write its archive exits with an error: do not ask it to
    written = folder / f"{archive.name}.{os.getpid()}.tmp"
    say(f"[dist-train] spark: the driver JVM writes its class archive as it exits, once (~160 MB in {folder}, "
        f"~10 s; later runs start ~3 s sooner; {ENV}=0: not)")

    def finish(ok: bool) -> None:
        if ok and written.is_file():
            os.replace(written, archive)  # whole, or not there: never a half-written archive in use
            _prune(folder)
        else:
            written.unlink(missing_ok=True)

    return ["--conf", f"{KEY}={QUIET} -XX:ArchiveClassesAtExit={written}"], finish


def _nothing(ok: bool) -> None:
    pass


def _client_mode(args: list[str]) -> bool:
    text = " ".join(args)
    return not re.search(r"--deploy-mode[= ]cluster|spark\.submit\.deployMode=cluster", text)


def _user_sets_default_options(args: list[str], environ: Mapping[str, str]) -> bool:
    if any(KEY in a for a in args):
        return True
    conf_dir = environ.get("SPARK_CONF_DIR") or (Path(environ["SPARK_HOME"]) / "conf" if environ.get("SPARK_HOME") else None)
    defaults = Path(conf_dir) / "spark-defaults.conf" if conf_dir else None
    try:
        return defaults is not None and defaults.is_file() and KEY in defaults.read_text(errors="replace")
    except OSError:
        return True  # cannot tell: leave the user's settings alone


def _java(environ: Mapping[str, str]) -> Path | None:
    """The java spark-class runs: $JAVA_HOME/bin/java, else the one on PATH."""
    if environ.get("JAVA_HOME"):
        found = Path(environ["JAVA_HOME"]) / "bin" / "java"
        return found.resolve() if found.is_file() else None
    found = shutil.which("java", path=environ.get("PATH"))
    return Path(found).resolve() if found else None


def _java_major(java: Path) -> int | None:
    """The major version in the JDK's `release` file beside bin/ (no JVM started to ask)."""
    try:
        text = (java.parent.parent / "release").read_text(errors="replace")
    except OSError:
        return None
    m = re.search(r'^JAVA_VERSION="(1\.)?(\d+)', text, re.M)
    return int(m.group(2)) if m else None


def _spark_home(environ: Mapping[str, str]) -> Path | None:
    if environ.get("SPARK_HOME"):
        return Path(environ["SPARK_HOME"])
    spec = importlib.util.find_spec("pyspark")  # pip's pyspark is its own SPARK_HOME (not imported here)
    return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


def _key(java: Path, spark_home: Path) -> str:
    """Names the archive by what the JVM checks it against: its java and Spark's jars."""
    h = hashlib.sha256(str(java).encode())
    for path in (java, java.parent.parent / "release"):
        with contextlib.suppress(OSError):
            st = path.stat()
            h.update(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode())
    with contextlib.suppress(OSError):
        for jar in sorted((spark_home / "jars").iterdir()):
            st = jar.stat()
            h.update(f"{jar.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _remove_orphans(folder: Path) -> None:
    """Archives being written by a run that was killed (its process gone)."""
    for tmp in folder.glob("jvm-*.jsa.*.tmp"):
        pid = tmp.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _prune(folder: Path) -> None:
    archives = sorted(folder.glob("jvm-*.jsa"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in archives[KEEP:]:
        old.unlink(missing_ok=True)

