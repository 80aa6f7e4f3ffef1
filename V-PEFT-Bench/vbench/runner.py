"""Execute one planned run and write its result JSON; skip it when an equal finished result exists.

Files of a run under the output folder (``RunSpec.rel_dir``)::

    <protocol>/<task>/<method>/<phase>/<tag>/result.json     the record below, written atomically at the end
    <protocol>/<task>/<method>/<phase>/<tag>/run/            the engine's run directory (config, metrics, adapter)

A task with ``evals`` (suite file) scores the trained adapter once more per eval, its saved config edited as the eval
says, on the test split (:func:`vpeft.engine.run_dir.evaluate_run`, as ``tools/test.py --set``): the record's
``evals`` maps each name to that split, its ``test_size`` and its metrics.

A run is skipped when ``result.json`` says ``ok`` and holds the same resolved config. A run that was killed resumes
from its last epoch checkpoint (the engine's ``resume``); one that raised is recorded as ``failed`` with its
traceback, retried on the next invocation, and never stops the other runs. ``checkpoint.pt`` (optimizer state, the
size of the trainable weights times three) is deleted after success unless ``keep_checkpoints``.
"""

from __future__ import annotations

import datetime
import gc
import json
import logging
import resource
import shutil
import traceback
from pathlib import Path
from typing import Any

import torch

from vpeft.engine.config import config_to_dict, load_config
from vpeft.engine.run_dir import evaluate_run
from vpeft.engine.system import environment
from vpeft.engine.train import train
from vpeft.files import atomic_write

from .board import BEST_EPOCH, metric_key, score
from .protocol import RunSpec

log = logging.getLogger("vpeft.bench")
SCHEMA = "vpeft.bench.result/1"
RESULT = "result.json"
# Every record has these keys; "ok" records also have a number in each of OK_NUMBERS.
REQUIRED = (
    "schema", "status", "suite", "protocol", "phase", "task", "group", "method", "method_name", "options", "seed",
    "hparams", "train_split", "eval_split", "overrides", "config", "git_commit", "versions", "finished_at",
)  # fmt: skip
OK_NUMBERS = (
    "trainable_params", "trainable_params_with_head", "peak_memory_mb", "images_per_second", "wall_seconds",
)  # fmt: skip


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_result(record: dict[str, Any]) -> list[str]:
    """What is wrong with a result record (missing keys, wrong types); empty when it follows the schema."""
    problems = [f"missing key {k!r}" for k in REQUIRED if k not in record]
    if record.get("schema") != SCHEMA:
        problems.append(f"schema is {record.get('schema')!r}, expected {SCHEMA!r}")
    if record.get("status") not in ("ok", "failed"):
        problems.append(f"status is {record.get('status')!r}, expected 'ok' or 'failed'")
    if record.get("status") == "ok":
        for key in (metric_key(record), *OK_NUMBERS):
            if not _is_number(record.get(key)):
                problems.append(f"{key} is {record.get(key)!r}, expected a number")
        if record.get("protocol") == "literature" and not _is_number(score(record, best_epoch=True)):
            problems.append(f"literature record without {metric_key(record, best_epoch=True)}")
        if record.get("test_size") is not None and not (_is_number(record["test_size"]) and record["test_size"] > 0):
            problems.append(f"test_size is {record['test_size']!r}, expected a positive count")
        hits = record.get("test_hits")
        if hits is not None and not (
            isinstance(hits, str) and len(hits) == record.get("test_size") and set(hits) <= {"0", "1"}
        ):
            problems.append("test_hits is not a string of 0 and 1, one per test item")
        evals = record.get("evals") or {}
        if not isinstance(evals, dict):
            problems.append(f"evals is {evals!r}, expected an object of eval name -> metrics")
        else:
            for name, numbers in evals.items():
                if not (isinstance(numbers, dict) and _is_number(numbers.get(metric_key(record)))):
                    problems.append(f"evals.{name} has no number under {metric_key(record)!r}")
    elif not record.get("error"):
        problems.append("failed record without error")
    return problems


def read_result(path: Path) -> dict[str, Any] | None:
    """The record at ``path``, or None when it is absent or unreadable (a half-written file cannot exist)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _record(spec: RunSpec, recipe: Path, config: dict[str, Any] | None) -> dict[str, Any]:
    env = environment()
    data = (config or {}).get("data", {})
    return {
        "schema": SCHEMA,
        "suite": spec.suite,
        "protocol": spec.protocol,
        "phase": spec.phase,
        "task": spec.task.name,
        "group": spec.task.group,
        "method": spec.method.label,
        "method_name": spec.method.name,
        "baseline": spec.method.baseline,
        "options": {k: v for k, v in (config or {}).get("method", {}).items() if k != "name"},
        "seed": spec.seed,
        "hparams": dict(spec.point),
        "train_split": data.get("train_split"),
        "eval_split": data.get("test_split"),
        "recipe": str(recipe),
        "overrides": list(spec.overrides),
        "config": config,
        "git_commit": env["git_commit"],
        "versions": env["versions"],
        "device": env["gpu"] or "cpu",
        "python": env["python"],
        "platform": env["platform"],
    }


def _metrics_from(summary: dict[str, Any], protocol: str) -> dict[str, Any]:
    metric = summary.get("metric", "top1")
    numbers = {
        "metric": metric,
        metric: summary["test"][metric],
        "test_metrics": summary["test"],  # every number the task reports (macro-F1, answer perplexity, loss...)
        "test_size": summary.get("test_size"),  # items on the eval split: the binomial standard error's n
        "test_hits": summary.get("test_hits"),  # "1"/"0" per test item in order (a paired check's data), or None
        "trainable_params": summary["trainable_params"],
        "trainable_params_with_head": summary["trainable_params_with_head"],
        "peak_memory_mb": summary["peak_memory_mb"],
        "images_per_second": summary["images_per_second"],
        "wall_seconds": summary["wall_seconds"],
        "epochs": summary["epochs"],
    }
    if protocol == "literature":  # the engine's "val" split is the test split here: best-over-epochs on test
        best = summary.get("best_val") or {}
        numbers[metric + BEST_EPOCH] = max(best.get(metric, float("-inf")), summary["test"][metric])
        numbers["best_epoch"] = best.get("epoch")
    return numbers


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (data-loader workers)."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def execute(spec: RunSpec, recipe: Path, out: Path, keep_checkpoints: bool = False) -> tuple[dict[str, Any], bool]:
    """Run ``spec`` (or skip it) and return ``(record, ran)``; exceptions become ``failed`` records."""
    folder = out / spec.rel_dir
    run_dir = folder / "run"
    config = None
    try:
        cfg = load_config(recipe, list(spec.overrides))
        config = config_to_dict(cfg)
        previous = read_result(folder / RESULT)
        same_evals = set((previous or {}).get("evals") or {}) == set(spec.task.evals)  # evals added later: rerun
        if previous and previous.get("status") == "ok" and previous.get("config") == config and same_evals:
            return previous, False
        resume = (run_dir / "checkpoint.pt").is_file() and (run_dir / "config.yaml").is_file()
        if resume:
            resume = load_config(run_dir / "config.yaml") == cfg
        if not resume and run_dir.exists():
            shutil.rmtree(run_dir)  # a run that died before its first checkpoint, or under another config
        cpu = _cpu_seconds()
        summary = train(cfg, run_dir, resume=resume)
        record = {**_record(spec, recipe, config), "status": "ok", **_metrics_from(summary, spec.protocol)}
        if spec.task.evals:
            record["evals"] = {name: evaluate_run(run_dir, None, edits) for name, edits in spec.task.evals.items()}
        record["cpu_seconds"] = _cpu_seconds() - cpu  # survives a busy shared machine better than wall time
        if not keep_checkpoints:
            (run_dir / "checkpoint.pt").unlink(missing_ok=True)
    except Exception as err:  # noqa: BLE001 - one failing run must not stop the sweep; KeyboardInterrupt still does
        log.error("run %s failed: %s", spec.rel_dir, err)
        record = {**_record(spec, recipe, config), "status": "failed", "error": traceback.format_exc()[-4000:]}
    if record["status"] == "failed":  # the traceback's frames held the model: free it and the GPU cache now
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    record["finished_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    record["run_dir"] = str(run_dir)
    text = json.dumps(record, indent=2, default=str) + "\n"
    atomic_write(folder / RESULT, lambda tmp: Path(tmp).write_text(text))
    return record, True


def collect(out: Path) -> list[dict[str, Any]]:
    """Every result record under ``out`` (files that do not follow the schema are reported and left out)."""
    records = []
    for path in sorted(Path(out).rglob(RESULT)):
        record = read_result(path)
        problems = check_result(record) if isinstance(record, dict) else ["not a json object"]
        if problems:
            log.warning("%s: ignored (%s)", path, "; ".join(problems))
            continue
        records.append(record)
    return records
