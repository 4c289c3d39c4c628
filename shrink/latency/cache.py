"""The latency tables on disk: JSON (never pickle), one file per environment.

Location: ``$SHRINK_CACHE_DIR/latency/`` when ``SHRINK_CACHE_DIR`` is set, else
``$XDG_CACHE_HOME/shrink/latency/`` or ``~/.cache/shrink/latency/``.

A file holds the numbers of one *key*: the device (``/proc/cpuinfo`` model name or the GPU's
name), the runtime and its version, the threads, the batch and the model's input size. Its name is
``<runtime>-<sha256 of the key>.json`` and it records the key it was written for, so a changed
setting is a different file (a miss), never a stale hit. Inside, ``tables`` maps each layer
signature (:meth:`shrink.latency.layers.Term.signature`) to its measured table, and
``calibration`` maps a model fingerprint to the (predicted, measured) kept fractions of the plans
timed end to end, which start the next allocation for that model already calibrated.

Saving re-reads the file, merges, and replaces it atomically (a temporary file renamed into
place), so concurrent runs lose nothing but a duplicate measurement. A file that cannot be read,
is not JSON, or has another schema or key is ignored with a log message and rewritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shrink.errors import ConfigError
from shrink.latency.table import Table

log = logging.getLogger(__name__)

SCHEMA = 1


def cache_root() -> Path:
    """The directory of latency cache files (see the module docstring)."""
    env = os.environ.get("SHRINK_CACHE_DIR")
    if env:
        return Path(env).expanduser() / "latency"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "shrink" / "latency"


class LatencyCache:
    """The tables and calibration points of one environment key.

    Args:
        key: the environment (string values); see the module docstring.
        root: the directory (default :func:`cache_root`).

    Example:
        >>> cache = LatencyCache({"runtime": "onnxruntime-cpu", "threads": "1", ...})
        >>> table = cache.get(term.signature())   # None: measure it, then cache.put(...)
        >>> cache.save()
    """

    def __init__(self, key: Mapping[str, str], root: str | os.PathLike[str] | None = None) -> None:
        self.key = dict(sorted((str(k), str(v)) for k, v in key.items()))
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:16]
        slug = re.sub(r"[^a-z0-9]+", "-", self.key.get("runtime", "latency").lower()).strip("-")
        self.path = (Path(root) if root else cache_root()) / f"{slug}-{digest}.json"
        self.tables: dict[str, Table] = {}
        self.calibration: dict[str, list[tuple[float, float]]] = {}
        self._dirty = False
        self._merge(self._read())

    def get(self, signature: str) -> Table | None:
        return self.tables.get(signature)

    def put(self, signature: str, table: Table) -> None:
        self.tables[signature] = table
        self._dirty = True

    def points(self, model: str) -> list[tuple[float, float]]:
        """The (predicted, measured) kept fractions recorded for a model fingerprint."""
        return list(self.calibration.get(model, []))

    def add_points(self, model: str, points: list[tuple[float, float]]) -> None:
        merged = dict(self.calibration.get(model, []))
        merged.update(points)
        self.calibration[model] = sorted(merged.items())[-16:]
        self._dirty = True

    def save(self) -> None:
        """Merge into the file and replace it atomically; an unwritable cache is logged, not
        raised (the numbers are then measured again next time)."""
        if not self._dirty:
            return
        self._merge(self._read(), keep_mine=True)
        data = {"schema": SCHEMA, "key": self.key,
                "tables": {s: t.to_dict() for s, t in sorted(self.tables.items())},
                "calibration": {m: [list(p) for p in pts]
                                for m, pts in sorted(self.calibration.items())}}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=0, sort_keys=True)
            mask = os.umask(0o022)
            os.umask(mask)
            os.chmod(tmp, 0o666 & ~mask)
            os.replace(tmp, self.path)
            self._dirty = False
        except OSError as e:
            log.warning("latency: cannot write the cache %s (%s); tables will be measured "
                        "again next time", self.path, e)

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning("latency: ignoring unreadable cache %s (%s)", self.path, e)
            return {}
        if not isinstance(data, dict) or data.get("schema") != SCHEMA or data.get("key") != \
                self.key:
            log.warning("latency: ignoring cache %s: another schema or key", self.path)
            return {}
        return data

    def _merge(self, data: dict[str, Any], keep_mine: bool = False) -> None:
        tables = data.get("tables", {})
        for sig, d in tables.items() if isinstance(tables, dict) else ():
            if keep_mine and sig in self.tables:
                continue
            try:
                self.tables[str(sig)] = Table.from_dict(d)
            except ConfigError as e:
                log.warning("latency: ignoring corrupt table %r in %s (%s)", sig, self.path, e)
        calibration = data.get("calibration", {})
        for model, pts in calibration.items() if isinstance(calibration, dict) else ():
            try:
                theirs = [(float(p), float(m)) for p, m in pts]
            except (TypeError, ValueError):
                continue
            mine = self.calibration.get(str(model), [])
            self.calibration[str(model)] = sorted(dict(theirs + mine).items())[-16:]
