"""`atkd sweep sweep.yaml`: students x seeds x teachers, each (teacher, seed) an ordinary `atkd run` directory.

The sweep file (configs/demo-sweep.yaml is one):

    config: ../pipeline.yaml        # every run starts from it (relative to the sweep file)
    out_dir: runs/sweep             # relative to the current directory, like run_dir
    seeds: [0, 1, 2]                # each run sets every student's `seed`
    students: [base, sft, kd]       # optional: default all of the config's, and the variants
    set: {eval.backend: transformers}   # optional: overrides of every run (key path -> value)
    baseline: sft                   # optional: the report compares every student with this one
    variants:                       # optional: students derived from one of the config's
      - {name: atkd-hr0.3, from: atkd, set: {loss.hard_ratio: 0.3}}
    teachers:                       # optional; default one teacher, `default`: the config as it is
      - {name: default}
      - {name: top8, set: {teacher.top_k: 8}, students: [kd]}

Layout under out_dir (this module owns it):

    sweep.json                       the plan: each run's config, directory, state and seconds
    configs/<teacher>-seed<k>.yaml   each run's config: `atkd run` on it continues or redoes that run
    demo/<teacher>/                  demo data, tokenizer and teacher (demo.dir), one per distinct demo + data
                                     settings: a teacher that changes only teacher.top_k shares another's
    teachers/<teacher>/cache, cache-val   the teacher's training and validation caches, shared by its seeds
    runs/<teacher>/seed-<k>/         the runs (config.yaml, students/, eval/, report/, logs/)
    report.md, results.json, sweep.png    stages.eval.sweep_report: mean and 95% interval per (teacher, model)

`cache.path`, `eval.validation_cache` and `demo.dir` of the config are replaced
by this layout unless the sweep's or the teacher's `set` names them. A student
that a listed one starts from (`init_from`) is trained too. Runs go one after
another in this process; a finished run (every student trained, evaluation
current) is skipped, an unfinished one continues where it stopped (`atkd
run`'s own resumption), so a killed sweep continues when started again. The
report is rewritten after each run, from the finished runs.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline import orchestrator as runner
from pipeline.config import (ConfigError, PipelineConfig, StudentConfig, _apply_override, _build, check_name,
                             config_from_raw, read_yaml)
from storage.files import atomic_write

KEYS = ("config", "out_dir", "seeds", "students", "set", "baseline", "variants", "teachers")
PLAN = "sweep.json"


def _log(msg: str) -> None:
    print(f"[atkd sweep] {msg}", flush=True)


@dataclass
class Teacher:
    name: str
    set: dict = field(default_factory=dict)
    students: list[str] | None = None


@dataclass
class Variant:
    name: str
    origin: str
    set: dict = field(default_factory=dict)


@dataclass
class Sweep:
    path: Path
    config: Path
    out_dir: Path
    seeds: list[int]
    students: list[str] | None = None
    set: dict = field(default_factory=dict)
    baseline: str | None = None
    variants: list[Variant] = field(default_factory=list)
    teachers: list[Teacher] = field(default_factory=lambda: [Teacher("default")])
    overrides: list[str] = field(default_factory=list)  # a.b=c from the command line, for every run


@dataclass
class Run:
    teacher: str
    seed: int
    config_path: Path
    raw: dict  # the YAML tree of config_path
    cfg: PipelineConfig

    @property
    def label(self) -> str:
        return f"{self.teacher}/seed-{self.seed}"


# ---------------------------------------------------------------- the sweep file


def _mapping(value, where: str, allowed: tuple[str, ...]) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)}")
    return value


def _names(value, where: str) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: expected a non-empty list of student names, got {value!r}")
    return list(value)


def _sets(value, where: str) -> dict:
    value = _mapping(value or {}, where, tuple(str(k) for k in (value or {})))
    if not all(isinstance(k, str) and k for k in value):
        raise ConfigError(f"{where}: keys must be key paths such as loss.hard_ratio")
    return value


def _check_variant(variant: Variant, origin: dict, where: str) -> None:
    """The variant's `set` applied to its origin student, checked like a config's student, so a typo is
    reported where it was made (variants[i].set.loss: unknown key ...), not as a student of every run."""
    student = json.loads(json.dumps(origin))  # a plain copy (YAML anchors)
    student["name"] = variant.name
    for key, value in variant.set.items():
        _override(student, key, value, where)
    _build(StudentConfig, student, where)


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> Sweep:
    """Read and check a sweep file (names against the config's students); the runs are checked by plan()."""
    path = Path(path)
    raw = _mapping(read_yaml(path, "sweep file"), str(path), KEYS)
    where = lambda key: f"{path}: {key}"  # noqa: E731
    if not isinstance(raw.get("config"), str):
        raise ConfigError(f"{where('config')}: set the pipeline config every run starts from (relative to {path})")
    seeds = raw.get("seeds")
    if (not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                              for s in seeds) or len(set(seeds)) != len(seeds)):
        raise ConfigError(f"{where('seeds')}: expected a list of distinct integers, got {seeds!r}")
    out_dir = raw.get("out_dir", f"runs/{path.stem}")
    if not isinstance(out_dir, str) or not out_dir:
        raise ConfigError(f"{where('out_dir')}: expected a directory path, got {out_dir!r}")
    spec = Sweep(path=path, config=path.parent / raw["config"], out_dir=Path(out_dir), seeds=list(seeds),
                 students=_names(raw.get("students"), where("students")), set=_sets(raw.get("set"), where("set")),
                 baseline=raw.get("baseline"), overrides=list(overrides or []))
    config_raw = [s for s in read_yaml(spec.config).get("students") or [] if isinstance(s, dict)]
    config_students = [s.get("name") for s in config_raw]
    for i, item in enumerate(raw.get("variants") or []):
        w = where(f"variants[{i}]")
        item = _mapping(item, w, ("name", "from", "set"))
        name, origin = item.get("name"), item.get("from")
        check_name(name if isinstance(name, str) else "", f"{w}.name")
        if name in config_students or name in [v.name for v in spec.variants]:
            raise ConfigError(f"{w}.name: {name!r} is already a student of {spec.config} or an earlier variant")
        if origin not in config_students:
            raise ConfigError(f"{w}.from: {origin!r} is not a student of {spec.config} "
                              f"(its students: {', '.join(config_students) or 'none'})")
        spec.variants.append(Variant(name, origin, _sets(item.get("set"), f"{w}.set")))
        _check_variant(spec.variants[-1], config_raw[config_students.index(origin)], f"{w}.set")
    if raw.get("teachers") is not None:
        if not isinstance(raw["teachers"], list) or not raw["teachers"]:
            raise ConfigError(f"{where('teachers')}: expected a non-empty list of {{name, set, students}}")
        spec.teachers = []
        for i, item in enumerate(raw["teachers"]):
            w = where(f"teachers[{i}]")
            item = _mapping(item, w, ("name", "set", "students"))
            name = item.get("name")
            check_name(name if isinstance(name, str) else "", f"{w}.name")
            if name in [t.name for t in spec.teachers]:
                raise ConfigError(f"{w}.name: duplicate teacher name {name!r}")
            spec.teachers.append(Teacher(name, _sets(item.get("set"), f"{w}.set"),
                                         _names(item.get("students"), f"{w}.students")))
    known = config_students + [v.name for v in spec.variants]
    named = [(where("students"), spec.students)] + [(where(f"teachers[{i}].students"), t.students)
                                                     for i, t in enumerate(spec.teachers)]
    named.append((where("baseline"), [spec.baseline] if spec.baseline is not None else None))
    for w, names in named:
        for name in names or []:
            if name not in known:
                raise ConfigError(f"{w}: no student named {name!r} in {spec.config} or the sweep's variants "
                                  f"(students: {', '.join(known) or 'none'})")
    return spec


# ---------------------------------------------------------------- the runs


def _override(raw: dict, key: str, value, where: str) -> None:
    try:
        _apply_override(raw, f"{key}={json.dumps(value)}")  # JSON is YAML: the value arrives as it was
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _teacher_tree(spec: Sweep, base: dict, teacher: Teacher) -> dict:
    """The config tree of one teacher's runs: variants added, overrides applied, students chosen."""
    raw = json.loads(json.dumps(base))  # plain copies: YAML anchors (&distil) must not tie students together
    students = raw.setdefault("students", [])
    by_name = {s.get("name"): s for s in students if isinstance(s, dict)}
    for v in spec.variants:
        student = copy.deepcopy(by_name[v.origin])
        student["name"] = v.name
        for key, value in v.set.items():
            _override(student, key, value, f"{spec.path}: variant {v.name!r}")
        students.append(student)
        by_name[v.name] = student
    for text in spec.overrides:
        _apply_override(raw, text)
    for key, value in {**spec.set, **teacher.set}.items():
        _override(raw, key, value, f"{spec.path}: teacher {teacher.name!r}")
    wanted, keep = teacher.students or spec.students, set()

    def need(name: str) -> None:
        if name in by_name and name not in keep:
            keep.add(name)
            need(by_name[name].get("init_from") or "")

    for name in wanted if wanted is not None else list(by_name):
        need(name)
    raw["students"] = [s for s in students if isinstance(s, dict) and s.get("name") in keep]
    return raw


def _user_keys(spec: Sweep, teacher: Teacher) -> set[str]:
    return {*spec.set, *teacher.set, *(o.partition("=")[0].strip() for o in spec.overrides)}


def _demo_key(cfg: PipelineConfig) -> str:
    """What the demo build depends on: its section and the data's (not where either lives)."""
    demo = {k: v for k, v in dataclasses.asdict(cfg.demo).items() if k != "dir"}
    data = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k != "path"}
    return json.dumps({"demo": demo, "data": data}, sort_keys=True, default=str)


def _load(raw: dict, where: str) -> PipelineConfig:
    try:
        return config_from_raw(copy.deepcopy(raw))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def plan(spec: Sweep) -> list[Run]:
    """Every (teacher, seed) run, its config checked (nothing is written)."""
    base, out = read_yaml(spec.config), spec.out_dir
    runs, demo_dirs = [], {}
    for teacher in spec.teachers:
        raw = _teacher_tree(spec, base, teacher)
        tdir, user = out / "teachers" / teacher.name, _user_keys(spec, teacher)
        raw["run_dir"] = str(out / "runs" / teacher.name / "seed-0")
        if "cache.path" not in user:
            raw.setdefault("cache", {})["path"] = str(tdir / "cache")
        if "eval.validation_cache" not in user:
            raw.setdefault("eval", {})["validation_cache"] = str(tdir / "cache-val")
        where = f"{spec.path}: teacher {teacher.name!r}"
        cfg = _load(raw, where)
        if cfg.demo.enabled and "demo.dir" not in user:
            demo_dir = demo_dirs.setdefault(_demo_key(cfg), str(out / "demo" / teacher.name))
            raw.setdefault("demo", {})["dir"] = demo_dir
        for seed in spec.seeds:
            run_raw = copy.deepcopy(raw)
            run_raw["run_dir"] = str(out / "runs" / teacher.name / f"seed-{seed}")
            for student in run_raw["students"]:
                student["seed"] = seed
            runs.append(Run(teacher.name, seed, out / "configs" / f"{teacher.name}-seed{seed}.yaml", run_raw,
                            _load(run_raw, f"{where}, seed {seed}")))
    return runs


# ---------------------------------------------------------------- plan file, running, report


def _read_seconds(out: Path) -> dict[str, float]:
    try:
        return {r["label"]: float(r.get("seconds", 0.0)) for r in json.loads((out / PLAN).read_text())["runs"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _write_plan(spec: Sweep, runs: list[Run], seconds: dict[str, float], finished: dict[str, bool]) -> None:
    plan_doc = {"sweep": str(spec.path), "config": str(spec.config), "seeds": spec.seeds,
                "wall_seconds": round(sum(seconds.values()), 1),
                "runs": [{"label": r.label, "teacher": r.teacher, "seed": r.seed, "config": str(r.config_path),
                          "run_dir": r.cfg.run_dir, "cache": r.cfg.cache.path,
                          "demo_dir": r.cfg.demo.dir if r.cfg.demo.enabled else None,
                          "students": [s.name for s in r.cfg.students], "finished": finished.get(r.label, False),
                          "seconds": round(seconds.get(r.label, 0.0), 1)} for r in runs]}
    spec.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(spec.out_dir / PLAN, json.dumps(plan_doc, indent=1))


def plan_text(spec: Sweep, runs: list[Run]) -> str:
    lines = [f"sweep {spec.path}: {len(runs)} runs ({len(spec.teachers)} teacher(s) x {len(spec.seeds)} seeds) "
             f"into {spec.out_dir}"]
    for r in runs:
        state = "finished" if runner.run_finished(r.cfg) else "to do"
        lines.append(f"  {r.label}: {state}; students {', '.join(s.name for s in r.cfg.students)}; "
                     f"cache {r.cfg.cache.path}" + (f"; demo {r.cfg.demo.dir}" if r.cfg.demo.enabled else ""))
    return "\n".join(lines)


def run_sweep(spec: Sweep, runs: list[Run] | None = None) -> str:
    """Run (or continue) every run not finished, then write the report; returns its path."""
    runs = runs if runs is not None else plan(spec)
    seconds = _read_seconds(spec.out_dir)
    finished = {r.label: runner.run_finished(r.cfg) for r in runs}
    _write_plan(spec, runs, seconds, finished)
    for i, run in enumerate(runs, 1):
        if finished[run.label]:
            _log(f"run {i}/{len(runs)} {run.label}: finished ({run.cfg.run_dir}); skipping")
            continue
        _log(f"run {i}/{len(runs)} {run.label}: {run.cfg.run_dir} (config {run.config_path})")
        run.config_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(run.config_path, yaml.safe_dump(run.raw, sort_keys=False))
        t0 = time.perf_counter()
        try:
            runner.run_all(run.cfg)
        finally:
            seconds[run.label] = seconds.get(run.label, 0.0) + time.perf_counter() - t0
            finished[run.label] = runner.run_finished(run.cfg)
            _write_plan(spec, runs, seconds, finished)
        if i < len(runs):  # a long sweep's report grows run by run
            write_report(spec, runs, seconds, finished)
    return write_report(spec, runs, seconds, finished)


def write_report(spec: Sweep, runs: list[Run], seconds: dict[str, float], finished: dict[str, bool]) -> str:
    """The sweep's report from every finished run's eval/results.json and per-example scores."""
    from pipeline.evaluation import load_results
    from stages.eval.evaluate import read_example_scores
    from stages.eval.sweep_report import SeedResult, Sweep as About, machine, write_sweep_report

    cells: dict[tuple[str, str], list] = {}
    for run in runs:
        results = load_results(run.cfg) if finished.get(run.label) else None
        for model, metrics in (results or {}).items():
            generations = runner.results_path(run.cfg).parent / f"{model}.generations.jsonl"
            examples = read_example_scores(generations) if generations.is_file() else {}
            per_set = {name: runner.results_path(run.cfg).parent / "sets" / name / f"{model}.generations.jsonl"
                       for name in (metrics.get("sets") or {})}
            per_set = {name: read_example_scores(path) for name, path in per_set.items() if path.is_file()}
            cells.setdefault((run.teacher, model), []).append(SeedResult(run.seed, metrics, examples, per_set))
    total = sum(seconds.get(r.label, 0.0) for r in runs)
    describe = lambda sets: ", ".join(f"{k}={json.dumps(v)}" for k, v in sets.items())  # noqa: E731
    about = About(
        lines=[f"- sweep: `{spec.path}` (config `{spec.config}`), {len(runs)} runs: "
               f"{len(spec.teachers)} teacher(s) x seeds {spec.seeds}; finished: "
               + (f"all {len(runs)}" if all(finished.get(r.label) for r in runs) else
                  f"{sum(bool(finished.get(r.label)) for r in runs)} of {len(runs)} (`atkd sweep` continues)"),
               f"- machine: {machine()}",
               f"- wall time: {total / 60:.1f} min in runs (sum over runs and invocations of `atkd sweep`; the "
               f"first run of a teacher includes its demo build and caches)"],
        teachers={t.name: describe(t.set) for t in spec.teachers}, baseline=spec.baseline,
        variants=[(v.name, v.origin, describe(v.set)) for v in spec.variants],
        runs=[{"teacher": r.teacher, "seed": r.seed, "run_dir": r.cfg.run_dir,
               "seconds": round(seconds.get(r.label, 0.0), 1)} for r in runs])
    path = write_sweep_report(spec.out_dir, cells, about)
    _log(f"report written to {path}")
    return path
