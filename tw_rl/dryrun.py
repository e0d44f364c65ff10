"""``tw-rl train --dry-run``: what a config would do, checked offline in seconds.

:func:`plan` validates the config (already done by ``load_config``), resolves every component — the phase-2
algorithm module, the data loader, the tokenizer and both models, the evaluation metrics — and lists what the run
would download (model and dataset ids, and whether they are already in the local Hugging Face cache) and the
resources it would ask Ray for, per actor type and in total. It downloads nothing, starts no Ray and loads no
weights. Problems that would stop the run later (a missing local directory, a model neither given nor trained, a
missing split file) raise :class:`~tw_rl.config.ConfigError` here; with ``data.kind=files`` every split is read
through the loader, so misaligned pair files, a truncated gzip or bad UTF-8 raise its
:class:`~tw_rl.data.DataError` (file and line), and so does an over-long pair when the tokenizer is a local file
(``tokenizer.path`` or a given model's directory, read with the ``tokenizers`` library alone). A tokenizer that
phase 0 trains does not exist yet: ``tw-rl train`` checks the lengths with it before any model is trained.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from pathlib import Path
from typing import Any

from tw_rl.config import Config, ConfigError, given_tokenizer
from tw_rl.evaluation.task import resolve_task
from tw_rl.models.errors import ModelNotAvailableError
from tw_rl.models.location import is_package, local_path

_DATA_LOADERS = {"embedded": "tw_rl.data.embedded", "files": "tw_rl.data.files", "hf": "tw_rl.data.hf"}


class _Module:
    """A module found and parsed, not imported (importing a learner pulls in torch and transformers: seconds).
    ``names``: its top-level functions, classes and assignments."""

    def __init__(self, name: str):
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            raise ConfigError(f"module {name} is missing")
        self.__name__, self.path = name, Path(spec.origin)
        try:
            tree = ast.parse(self.path.read_text(), str(self.path))
        except SyntaxError as e:
            raise ConfigError(f"module {name} does not parse: {e}") from None
        self.names: set[str] = set()
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                self.names.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                self.names.update(t.id for t in targets if isinstance(t, ast.Name))


def _hub_cache() -> Path:
    from huggingface_hub import constants  # a constant, no network

    return Path(constants.HF_HUB_CACHE)


def _hub_cached(kind: str, repo_id: str) -> bool:
    """Whether the local Hugging Face hub cache holds any snapshot of ``repo_id`` (``kind``: models/datasets)."""
    d = _hub_cache() / f"{kind}--{repo_id.replace('/', '--')}" / "snapshots"
    return d.is_dir() and any(d.iterdir())


def _model(role: str, mcfg, cfg: Config) -> dict[str, Any]:
    """Where a model comes from: trained in phase 0, a local directory, or a hub download."""
    name = mcfg.name_or_path
    if name is None:
        if not cfg.pretrain.enabled:
            raise ConfigError(f"{role}.name_or_path is not set and pretrain.enabled=false: give a model "
                              f"({role}.name_or_path=DIR or a hub name) or enable phase 0")
        a = mcfg.arch
        if getattr(mcfg, "init_layers", None):
            return {"role": role, "source": "phase 0 (the teacher's layers, then trained)",
                    "arch": f"the teacher's embeddings, final norm, output layer and layers {list(mcfg.init_layers)}"}
        layers = f"{a.num_layers}+{a.num_decoder_layers}" if a.model_type == "t5" else f"{a.num_layers}"
        return {"role": role, "source": "phase 0 (trained from scratch)",
                "arch": f"{a.model_type} d_model={a.d_model} d_ff={a.d_ff} heads={a.num_heads} layers={layers}"}
    if mcfg.gguf_file or name.endswith(".gguf"):
        return _gguf(role, name, mcfg.gguf_file)
    return _named(role, name, mcfg.trust_remote_code)


def _gguf(role: str, name: str, gguf_file: str | None) -> dict[str, Any]:
    """A GGUF model source (a .gguf file, or a directory and ``gguf_file``): it must exist; it is read in phase 0."""
    try:
        where = local_path(name)
    except ModelNotAvailableError as e:
        raise ConfigError(f"{role}.name_or_path={name!r}: {e}") from None
    p = where / gguf_file if gguf_file else where
    if not p.is_file():
        key = f"{role}.name_or_path={name!r}" + (f" with {role}.gguf_file={gguf_file!r}" if gguf_file else "")
        raise ConfigError(f"{key}: no GGUF file at {p}")
    return {"role": role, "source": "GGUF file (a causal LM, dequantized to float32)", "path": str(p.resolve()),
            "bytes": p.stat().st_size}


def _named(role: str, name: str, trust_remote_code: bool = False, weights: bool = True) -> dict[str, Any]:
    """A local directory (checked; ``package:NAME`` an installed package's) or a hub id (download listed)."""
    try:
        p = local_path(name)
    except ModelNotAvailableError as e:
        raise ConfigError(f"{role}.name_or_path={name!r}: {e}") from None
    if p.exists() or name.startswith((".", "/", "~")) or is_package(name):
        if not p.is_dir():
            raise ConfigError(f"{role}.name_or_path={name!r}: no such directory")
        if weights and not ((p / "config.json").is_file() and any(p.glob("*.safetensors"))):
            raise ConfigError(f"{role}.name_or_path={name!r}: a model directory holds config.json and "
                              f"*.safetensors weights (safetensors only)")
        return {"role": role, "source": "local directory", "path": str(p.resolve())}
    if name.count("/") > 1 or not name.strip():
        raise ConfigError(f"{role}.name_or_path={name!r} is neither a local directory nor a hub id (ORG/NAME)")
    return {"role": role, "source": "Hugging Face hub", "id": name, "cached": _hub_cached("models", name),
            "trust_remote_code": bool(trust_remote_code)}


def _data(cfg: Config) -> dict[str, Any]:
    d = cfg.data
    splits = {"train": d.train_split, "validation": d.validation_split, "test": d.test_split}
    out: dict[str, Any] = {"kind": d.kind, "loader": _DATA_LOADERS[d.kind], "splits": splits,
                           "max_examples": d.max_examples}
    if importlib.util.find_spec(out["loader"]) is None:
        raise ConfigError(f"data.kind={d.kind}: loader module {out['loader']} is missing")
    if d.kind == "embedded":
        e = d.embedded
        out["size"] = {"train": e.n_train, "validation": e.n_validation, "test": e.n_test}
    elif d.kind == "files":
        if not d.path:
            raise ConfigError("data.kind=files needs data.path=DIR")
        root = Path(d.path).expanduser()
        if not root.is_dir():
            raise ConfigError(f"data.path={d.path!r}: no such directory")
        found = {}
        for role, split in splits.items():
            files = sorted(str(f.name) for f in root.iterdir() if f.name.split(".")[0] == split)
            if not files:
                raise ConfigError(f"data.path={d.path!r}: no files for the {role} split {split!r} (expected "
                                  f"{split}.{d.src_lang} and {split}.{d.tgt_lang}, {split}.jsonl or {split}.tsv)")
            found[split] = files
        out["files"] = found
        from tw_rl.data.files import read_split_with_report  # no torch: reads and checks every line

        out["pairs"], read = {}, {}
        for split in dict.fromkeys(splits.values()):  # each file opened whole: a DataError names file and line
            read[split], report = read_split_with_report(d, split)
            out["pairs"][split] = {"kept": len(read[split]), "skipped": report.skipped}
        out["lengths"] = _lengths(cfg, read)
    else:
        if not d.hf_name:
            raise ConfigError("data.kind=hf needs data.hf_name (e.g. wmt/wmt19 with data.hf_config=de-en, or xsum)")
        out.update(id=d.hf_name, config=d.hf_config, cached=_hub_cached("datasets", d.hf_name))
    return out


def _local_tokenizer(cfg: Config) -> Path | None:
    """The ``tokenizer.json`` of the tokenizer the run would use when it is given as a local directory
    (``tokenizer.path``, else a given model's — the order of phase 0); None when phase 0 trains it or it is a hub
    id."""
    given = given_tokenizer(cfg)
    f = Path(given).expanduser() / "tokenizer.json" if given else None
    return f if f is not None and f.is_file() else None


def _lengths(cfg: Config, pairs: dict[str, list]) -> dict[str, Any] | str:
    """Token lengths of every split read (``pairs``) against ``data.max_src_tokens`` (budget prompt counted) and
    ``data.max_tgt_tokens``, with the rule of every phase (:func:`tw_rl.data.validate.check_token_lengths`), when
    the tokenizer is a local file; ``data.on_error=raise`` makes an over-long pair a DataError naming it."""
    path = _local_tokenizer(cfg)
    if path is None:
        return "checked by tw-rl train before phase 0 (phase 0 builds the tokenizer)"
    from tw_rl.config import source_room
    from tw_rl.data.validate import FileTokenizer, check_token_lengths_with_report

    tok, d = FileTokenizer(path), cfg.data
    room = source_room(cfg, tok)
    out: dict[str, Any] = {"tokenizer": str(path)}
    for split, ps in pairs.items():
        _, report = check_token_lengths_with_report(ps, tok, room, d.max_tgt_tokens, d.on_error)
        out[split] = {"kept": report.kept, "skipped": report.skipped}
    return out


def _resources(cfg: Config, algo_module) -> dict[str, Any]:
    """What the run asks Ray for. Ray starts only in phase 2 with rollout workers (or an algorithm that runs its
    own Ray loop); the learner runs in the driver, which ``tw-rl submit`` reserves as the job's entrypoint."""
    t, r, lrn = cfg.teacher, cfg.rollout, cfg.learner
    actors: dict[str, dict[str, float]] = {}
    own_loop = "run_phase2" in algo_module.names
    if cfg.rl.enabled and r.num_workers > 0 and not own_loop:
        actors["teacher_replica"] = {"count": t.num_replicas, "CPU": t.num_cpus, "GPU": t.num_gpus}
        actors["rollout_worker"] = {"count": r.num_workers, "CPU": r.num_cpus, "GPU": r.num_gpus,
                                    "envs_per_worker": r.envs_per_worker}
    actors["learner (driver / job entrypoint)"] = {"count": 1, "CPU": lrn.num_cpus, "GPU": lrn.num_gpus}
    if cfg.rl.enabled and lrn.num_workers > 0 and not own_loop:  # data-parallel learner actors (tw_rl/distributed/data_parallel.py)
        actors["learner_worker"] = {"count": lrn.num_workers, "CPU": lrn.worker_num_cpus, "GPU": float(lrn.use_gpu)}
    total = {k: round(sum(a["count"] * a[k] for a in actors.values()), 6) for k in ("CPU", "GPU")}
    note = ("rollouts run in the driver (rollout.num_workers=0): Ray is not started"
            if r.num_workers == 0 and "learner_worker" not in actors else
            f"algorithm {cfg.algo!r} runs its own Ray loop: its actors are not listed" if own_loop else
            "phase 2 disabled: Ray is not started" if not cfg.rl.enabled else
            "Ray starts in phase 2; every actor must fit at once (the run refuses a local Ray that is too small)")
    return {"actors": actors, "total": total, "note": note,
            "episodes_per_iteration": r.num_workers * r.envs_per_worker if r.num_workers else r.envs_per_worker}


def plan(cfg: Config) -> dict[str, Any]:
    """The resolved run: components, downloads and Ray resources. Raises ConfigError on what would fail later."""
    from tw_rl.registry import ALGORITHMS

    if cfg.algo not in ALGORITHMS:
        raise ConfigError(f"algo={cfg.algo!r} is unknown; known: {sorted(ALGORITHMS)}")
    algo = _Module(ALGORITHMS[cfg.algo])
    if not ({"make_learner", "run_phase2"} & algo.names):
        raise ConfigError(f"algo={cfg.algo!r}: {algo.__name__} has neither make_learner nor run_phase2")
    task = resolve_task(cfg)
    if task == "summarization" and importlib.util.find_spec("rouge_score") is None:
        raise ConfigError("summarization needs rouge-score (pip install rouge-score)")
    models = [_model("teacher", cfg.teacher, cfg), _model("student", cfg.student, cfg)]
    if cfg.tokenizer.path:
        tok = _named("tokenizer", cfg.tokenizer.path, weights=False)
    elif cfg.teacher.name_or_path or cfg.student.name_or_path:
        tok = {"role": "tokenizer", "source": f"the {'teacher' if cfg.teacher.name_or_path else 'student'}'s"}
    else:
        tok = {"role": "tokenizer", "source": f"phase 0 (BPE trained on the data, {cfg.tokenizer.vocab_size} pieces)"}
    data = _data(cfg)
    downloads = [{"kind": "model", "id": m["id"], "cached": m["cached"]} for m in models + [tok] if "id" in m]
    if "id" in data:
        downloads.append({"kind": "dataset", "id": data["id"], "config": data["config"], "cached": data["cached"],
                          "splits": sorted(set(data["splits"].values()))})
    scratch = [m["role"] for m in models if m["source"] == "phase 0 (trained from scratch)"]
    distilled = [m["role"] for m in models if m["source"].startswith("phase 0 (the teacher's layers")]
    phase0 = ([f"train {' and '.join(scratch)} from scratch"] if scratch else []) + (
        [f"train the {distilled[0]} from the teacher's layers"] if distilled else [])
    if phase0 and cfg.pretrain.student_targets == "teacher":
        phase0[-1] += " on the teacher's greedy outputs (sequence-level distillation)"
    phases = {
        "phase0": "; ".join(phase0) if phase0 else "skipped (both models given)",
        "phase1": (f"KL-oracle behaviour cloning, {cfg.phase1.num_examples or 'all'} inputs × {cfg.phase1.epochs:g} "
                   f"epochs" if cfg.phase1.enabled else "disabled"),
        "phase2": phase2_summary(cfg, algo.__name__),
        "eval": f"{task}: " + {"summarization": "BLEU, chrF, ROUGE-1/2/L",
                               "math": "exact match of the final answer, BLEU, chrF",
                               "qa": "answer accuracy, BLEU, chrF"}.get(task, "BLEU, chrF")
                + (" + baselines" if cfg.eval.baselines else ""),
    }
    return {"out_dir": cfg.out_dir, "budgets": cfg.budgets, "algorithm": {"name": cfg.algo, "module": algo.__name__},
            "data": data, "tokenizer": tok, "models": models, "phases": phases, "downloads": downloads,
            "ray": _resources(cfg, algo), "offline": any(os.environ.get(v, "").lower() in {"1", "true", "yes", "on"}
                                                         for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))}


def phase2_summary(cfg: Config, module: str | None = None) -> str:
    """What phase 2 of ``cfg`` runs, in words (``--dry-run`` and ``tw-rl demo --help`` read it from the config):
    the RL loop and/or the call learner (``tw_rl.train.phase2``), what trains, and where rollouts run."""
    if not cfg.rl.enabled:
        return "disabled"
    parts = []
    if not (cfg.rl.call_learner == "rollout" and cfg.rl.trainable == "tau"):  # tw_rl.train.phase2: the RL loop
        what = "the <τ> decision" if cfg.rl.trainable == "tau" else "the whole student"
        parts.append(f"{cfg.algo}{f' ({module})' if module else ''}, {cfg.rl.iterations} iterations "
                     f"training {what} (rl.trainable={cfg.rl.trainable})")
    if cfg.rl.call_learner == "rollout":
        parts.append(f"then the call learner (rl.call_learner=rollout), {cfg.rl.call_rounds} round(s) on the "
                     f"<τ> gate" if parts else f"the call learner (rl.call_learner=rollout), {cfg.rl.call_rounds} "
                     f"round(s) on the <τ> gate")
    where = (f"{cfg.rollout.num_workers} Ray rollout workers, {cfg.teacher.num_replicas} teacher replica(s) on Ray" if cfg.rollout.num_workers > 0 else "rollouts in the driver (no Ray)")
    return "; ".join(parts) + f"; {where}"


def print_plan(p: dict[str, Any]) -> None:
    """A readable summary of :func:`plan` (the last line is the plan as JSON)."""
    import json

    print(f"config OK — run directory {p['out_dir']}, budgets {p['budgets']}")
    print(f"algorithm: {p['algorithm']['name']} → {p['algorithm']['module']}")
    d = p["data"]
    where = d.get("id") and f"{d['id']}" + (f" [{d['config']}]" if d.get("config") else "") or d.get("size") or \
        d.get("files")
    print(f"data: {d['kind']} via {d['loader']}: {where}; splits {d['splits']}"
          + (f", first {d['max_examples']} pairs per split" if d.get("max_examples") else ""))
    if d.get("pairs"):
        print("data read and checked (alignment, gzip, UTF-8): " + ", ".join(
            f"{s} {n['kept']} pairs" + (f" ({n['skipped']} bad lines skipped)" if n["skipped"] else "")
            for s, n in d["pairs"].items()))
        lengths = d["lengths"]
        print("token lengths: " + (lengths if isinstance(lengths, str) else f"checked with {lengths['tokenizer']}: "
              + ", ".join(f"{s} {n['kept']} within the limits" + (f", {n['skipped']} over (skipped)" if n["skipped"]
                                                                   else "")
                          for s, n in lengths.items() if s != "tokenizer")))
    for m in [p["tokenizer"], *p["models"]]:
        extra = m.get("id") or m.get("path") or m.get("arch") or ""
        print(f"{m['role']}: {m['source']}" + (f" {extra}" if extra else ""))
    for k, v in p["phases"].items():
        print(f"{k}: {v}")
    if p["downloads"]:
        print("would download:")
        for dl in p["downloads"]:
            print(f"  {dl['kind']} {dl['id']}" + ((f" [{dl['config']}]" if dl["config"] else "") + f" splits {dl['splits']}" if dl["kind"] == "dataset"
                                                  else "") + (" (already in the local cache)" if dl["cached"] else ""))
    else:
        print("would download: nothing")
    r = p["ray"]
    print(f"Ray resources ({r['note']}):")
    for name, a in r["actors"].items():
        print(f"  {a['count']} × {name}: {a['CPU']:g} CPU, {a['GPU']:g} GPU each")
    print(f"  total: {r['total']['CPU']:g} CPU, {r['total']['GPU']:g} GPU; {r['episodes_per_iteration']} episodes "
          f"per iteration")
    print(json.dumps(p))
