"""Using a trained run from Python: ``tw_rl.load(run_dir).generate(texts, budget=0.2)``.

>>> model = tw_rl.load("runs/demo")
>>> [g] = model.generate(["Ein Satz."], budget=0.2)
>>> g.text, g.marked(), g.from_teacher          # marked(): teacher tokens in ⟦…⟧

Inputs are checked before anything is decoded, so a bad input never stops a batch half-way: every problem of
every input is reported in one :class:`InputError` (a ``ValueError``).

- **Budget**: a number in ``[0, 1]`` from the run's trained grid (``model.budgets``). **[choice]** Other budgets
  are refused rather than written into the prompt: the student was trained to obey only the grid's prompts.
- **Empty input** (empty or only whitespace) is an error.
- **Length**: the student's input (budget prompt + text, with EOS) must fit ``data.max_src_tokens``, the limit the
  run was trained with. Longer inputs are an error unless ``truncate=True``, which keeps the longest prefix of
  the text's tokens that fits (``Generation.truncated`` says which inputs were cut, ``Generation.source`` what
  the models read). Outputs are at most ``data.max_tgt_tokens`` tokens.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from tw_rl.envs.token_mdp import Example
from tw_rl.budget import GRID_TOLERANCE, grid_level
from tw_rl.config import Config, load_config, source_room
from tw_rl.prompt import budget_prompt
from tw_rl.data import Pair
from tw_rl.decoding import Decoded, TauRule, decode
from tw_rl.examples import make_examples, pad_batch
from tw_rl.models.family import InputTemplate, family_of, start_token_id
from tw_rl.models.student import Student
from tw_rl.rundir import ArtefactError, RunDir
from tw_rl.teacher import Teacher

BRACKETS = ("⟦", "⟧")  # marks teacher tokens in plain text
ANSI_UNDERLINE = ("\x1b[4m", "\x1b[24m")  # marks teacher tokens on a terminal


class InputError(ValueError):
    """Bad inputs to :meth:`TrainedModel.generate`; the message lists every bad input by index."""


@dataclass(frozen=True)
class Generation:
    """One output with per-token provenance.

    ``token_ids`` is ``X_out`` (EOS included when produced); ``pieces[i]`` is the text token ``i`` adds to
    ``text`` ("" for special tokens); ``from_teacher[i]`` is true when the teacher produced token ``i``
    (a ``<τ>`` call).
    """

    text: str
    token_ids: list[int]
    pieces: list[str]
    from_teacher: list[bool]
    budget: float
    source: str
    truncated: bool = False

    @property
    def teacher_calls(self) -> int:
        return int(sum(self.from_teacher))

    @property
    def usage(self) -> float:
        """Teacher calls / output tokens (SPEC §5)."""
        return self.teacher_calls / max(1, len(self.token_ids))

    def marked(self, marks: tuple[str, str] = BRACKETS) -> str:
        """``text`` with the teacher's tokens wrapped in ``marks``; spaces stay outside, and teacher tokens that
        touch (pieces of one word) share one pair of marks: ``fator ⟦nin⟧ pes⟦zi⟧``, ``⟦panlur⟧ses``."""
        out = []
        for piece, teacher in zip(self.pieces, self.from_teacher):
            m = re.fullmatch(r"(\s*)(.*?)(\s*)", piece, flags=re.S)
            out.append(f"{m[1]}{marks[0]}{m[2]}{marks[1]}{m[3]}" if teacher and m[2] else piece)
        return "".join(out).strip().replace(marks[1] + marks[0], "")


class TrainedModel:
    """A trained student, its teacher and (loaded on first use) the phase-0 student, with the run's config.

    Built by :func:`load` from a run directory, or by the driver from the models it holds in memory.
    """

    def __init__(self, cfg: Config, tokenizer, student: Student, teacher: Teacher,
                 base_student_dir: str | Path | None = None, base_student: torch.nn.Module | None = None,
                 device: str | torch.device = "cpu"):
        self.cfg, self.tokenizer, self.teacher = cfg, tokenizer, teacher
        self.device = torch.device(device)
        self.student = student.to(self.device).eval()
        self._base, self._base_dir = base_student, base_student_dir

    # ----------------------------------------------------------------------------------------------------------
    @property
    def budgets(self) -> list[float]:
        return list(self.cfg.budgets)

    @property
    def max_len(self) -> int:
        return self.cfg.data.max_tgt_tokens

    @property
    def max_src_tokens(self) -> int:
        return self.cfg.data.max_src_tokens

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def start_id(self) -> int:
        """The student's decoder start (:func:`tw_rl.models.family.start_token_id`)."""
        return start_token_id(self.student.config, self.pad_id)

    @property
    def templates(self) -> tuple[InputTemplate, InputTemplate]:
        """How the teacher's and the student's inputs are written (:class:`tw_rl.models.family.InputTemplate`)."""
        return (InputTemplate(self.tokenizer, family_of(self.teacher.model), self.cfg.teacher.chat_template),
                InputTemplate(self.tokenizer, family_of(self.student.model), self.cfg.student.chat_template))

    @property
    def base_student(self) -> torch.nn.Module:
        """The phase-0 student (student alone; speculative decoding's draft), loaded on first use."""
        if self._base is None:
            if self._base_dir is None:
                raise ValueError("this TrainedModel has no phase-0 student (base_student_dir was not given)")
            from tw_rl.models.factory import load_model

            self._base = load_model(str(self._base_dir), trust_remote_code=self.cfg.student.trust_remote_code,
                                    gguf_file=self.cfg.student.gguf_file)[0]
        return self._base.to(self.device).eval()

    @property
    def base_as_student(self) -> Student:
        """The phase-0 student with ``<τ>`` appended (a copy; never trained to call): what the baselines that start
        from the plain small model decode with (:meth:`decode_base`)."""
        if getattr(self, "_base_student", None) is None:
            self._base_student = Student.from_base(copy.deepcopy(self.base_student), self.tokenizer).to(
                self.device).eval()
        return self._base_student

    @torch.no_grad()
    def decode_base(self, examples: Sequence[Example], rule: TauRule | None = None) -> Decoded:
        """Greedy decoding by the phase-0 student on the bare source (no budget prompt), the teacher called only
        where ``rule`` says (a Big-Little-Decoder-style fallback); without ``rule``, the student alone."""
        student = self.base_as_student
        ids, mask = pad_batch([e.teacher_src for e in examples], self.pad_id)
        return decode(student, ids.to(self.device), mask.to(self.device), max_len=self.max_len, eos_id=self.eos_id,
                      teacher=self.teacher, teacher_src=[e.teacher_src for e in examples], start_id=self.start_id,
                      pad_id=self.pad_id, allow_tau=False, tau_rule=rule)

    def with_student(self, student: Student) -> "TrainedModel":
        """The same teacher and run with another student (e.g. the phase-1 one)."""
        other = copy.copy(self)
        other.student = student.to(self.device).eval()
        return other

    # ----------------------------------------------------------------------------------------------------------
    def check_budget(self, budget: float) -> float:
        """``budget`` as a float in ``[0, largest trained level]`` (a grid level exactly when it is one,
        :func:`tw_rl.budget.grid_level`); :class:`InputError` naming the range otherwise. A budget between levels is read from the prompt like
        any other (the student was trained with ``budget_sampling=continuous`` or must interpolate); its optional
        ``<τ>`` trim is interpolated between the levels' offsets (:meth:`Student.tau_bias_for`)."""
        try:
            b = float(budget)
        except (TypeError, ValueError):
            raise InputError(f"budget={budget!r} is not a number; trained budgets: {self.budgets}") from None
        top = max(self.budgets)
        if not (0.0 <= b <= top + GRID_TOLERANCE):  # also NaN
            raise InputError(f"budget={budget!r} is outside [0, {top:g}], the range the student was trained on "
                             f"(levels {self.budgets})")
        level = grid_level(b, self.budgets)
        return b if level is None else level

    def examples(self, texts: Sequence[str], budgets: Sequence[float] | None = None, truncate: bool = False,
                 references: Sequence[str] | None = None) -> tuple[list[Example], list[bool]]:
        """Check and tokenize ``texts`` for every budget (default: the grid). Returns the examples and which inputs
        were truncated. Raises :class:`InputError` listing every bad input; nothing is decoded here."""
        budgets = list(self.budgets if budgets is None else budgets)
        problems, sources, cut = [], [], []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                problems.append(f"input {i}: expected a string, got {type(text).__name__}")
            elif not text.strip():
                problems.append(f"input {i}: the text is empty")
            else:
                fitted, problem = self._fit(text, budgets, truncate)
                if problem:
                    problems.append(f"input {i}: {problem}")
                else:
                    sources.append(fitted)
                    cut.append(fitted != text)
        if problems:
            raise InputError(f"{len(problems)} bad input(s) of {len(texts)}, nothing was generated:\n  "
                             + "\n  ".join(problems))
        refs = list(references) if references is not None else [""] * len(sources)
        pairs = [Pair(s, r) for s, r in zip(sources, refs)]
        return make_examples(pairs, self.tokenizer, budgets, self.cfg.budget_prompt, *self.templates,
                             task_prompt=self.cfg.task_prompt), cut

    def _fit(self, text: str, budgets: Sequence[float], truncate: bool) -> tuple[str, str]:
        """``(text, "")`` if its longest budget-prompted form fits; ``(its longest fitting prefix, "")`` when
        ``truncate``; ``("", what is wrong)`` otherwise."""
        limit = self.max_src_tokens

        def length(t: str) -> int:
            return max(len(ids) for ids in self.templates[1].inputs(
                [budget_prompt(self.cfg.budget_prompt, b) + self.cfg.task_prompt + t for b in budgets]))

        n = length(text)
        if n <= limit:
            return text, ""
        if not truncate:
            return "", (f"{n} tokens with the budget prompt, over the model's limit data.max_src_tokens={limit}; "
                        f"shorten it or pass truncate=True (tw-rl generate --truncate) to keep the first tokens")
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        k = len(ids) - (n - limit)
        while k > 0:
            cut = self.tokenizer.decode(ids[:k], skip_special_tokens=True).strip()
            if cut and length(cut) <= limit:
                return cut, ""
            k -= 1
        return "", f"the budget prompt alone fills the model's limit data.max_src_tokens={limit}"

    def load_examples(self, split: str, limit: int | None = None) -> list[Example]:
        """A split of the configured data source (``cfg.data``), length-checked as in training."""
        from tw_rl.data import load_split
        from tw_rl.data.validate import check_token_lengths

        pairs = load_split(self.cfg.data, split)[:limit]
        pairs = check_token_lengths(pairs, self.tokenizer, source_room(self.cfg, self.tokenizer), self.max_len,
                                    self.cfg.data.on_error)
        return make_examples(pairs, self.tokenizer, self.budgets, self.cfg.budget_prompt, *self.templates,
                             task_prompt=self.cfg.task_prompt)

    def student_src(self, example: Example, budget: float) -> list[int]:
        """The student's input ids of ``example`` at ``budget``: the stored ones, or (a budget the example was not
        tokenized for) ``prompt(budget) + text`` tokenized as :func:`tw_rl.examples.make_examples` does."""
        ids = example.student_src.get(budget)
        if ids is not None:
            return ids
        if not example.text:
            raise InputError(f"the example has no text to prompt at budget {budget:g} (it was tokenized for "
                             f"{sorted(example.student_src)})")
        return self.templates[1].inputs([budget_prompt(self.cfg.budget_prompt, budget) + self.cfg.task_prompt
                                         + example.text])[0]

    # ----------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, examples: Sequence[Example], budget: float, hard_cap: bool = False,
               rule: TauRule | None = None, tau_bias: float | None = None, zero_guard: bool = True) -> Decoded:
        """Greedy decoding of one batch by the student at ``budget``. With ``rule`` the student's own ``<τ>`` is
        masked and only the rule calls the teacher (baselines); at ``budget = 0`` ``<τ>`` is masked too (a
        deploy-time guard; ``zero_guard=False`` lets the raw student decide, to measure whether it obeys). The hard
        cap forbids ``<τ>`` once a row's calls reach ``ceil(b · max_len)`` (SPEC §5). ``tau_bias`` is the offset
        on the ``<τ>`` logit; None: the student's calibrated offset for ``budget`` (tw_rl/evaluation/calibration.py)."""
        ids, mask = pad_batch([self.student_src(e, budget) for e in examples], self.pad_id)
        cap = (torch.full((len(examples),), math.ceil(budget * self.max_len), device=self.device)
               if hard_cap else None)
        bias = self.student.tau_bias_for(budget) if tau_bias is None else float(tau_bias)
        return decode(self.student, ids.to(self.device), mask.to(self.device), max_len=self.max_len,
                      eos_id=self.eos_id, teacher=self.teacher, teacher_src=[e.teacher_src for e in examples],
                      start_id=self.start_id, pad_id=self.pad_id, allow_tau=(budget > 0 or not zero_guard) and rule is None,
                      call_cap=cap, tau_rule=rule,
                      tau_bias=torch.full((len(examples),), bias, device=self.device) if bias else None)

    def generate(self, texts: Sequence[str] | str, budget: float = 0.2, hard_cap: bool | None = None,
                 truncate: bool = False, batch_size: int | None = None) -> list[Generation]:
        """Translate (or summarise) ``texts`` with the student calling the teacher within ``budget``.

        ``hard_cap=None`` takes the run's ``eval.hard_cap``. A single string is one input. Raises
        :class:`InputError` (every bad input listed) before decoding anything.
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        b = self.check_budget(budget)
        examples, cut = self.examples(texts, [b], truncate=truncate)
        hard_cap = self.cfg.eval.hard_cap if hard_cap is None else hard_cap
        bs = batch_size or self.cfg.eval.batch_size
        out: list[Generation] = []
        for i in range(0, len(examples), bs):
            chunk = examples[i:i + bs]
            dec = self.decode(chunk, b, hard_cap=hard_cap)
            for k, e in enumerate(chunk):
                n = int(dec.lengths[k])
                out.append(self.generation(dec.tokens[k, :n].tolist(), dec.teacher_mask[k, :n], b, e.text,
                                           cut[i + k]))
        return out

    def generation(self, token_ids: Sequence[int], teacher_mask: Sequence[bool], budget: float, source: str,
                   truncated: bool = False) -> Generation:
        ids = [int(t) for t in token_ids]
        return Generation(text=self.tokenizer.decode(ids, skip_special_tokens=True).strip(), token_ids=ids,
                          pieces=token_pieces(self.tokenizer, ids), from_teacher=[bool(m) for m in teacher_mask],
                          budget=budget, source=source, truncated=truncated)


def token_pieces(tokenizer, ids: Sequence[int]) -> list[str]:
    """The text each token adds when ``ids`` is decoded left to right (special tokens add "")."""
    pieces, prev = [], ""
    for i in range(len(ids)):
        cur = tokenizer.decode(list(ids[:i + 1]), skip_special_tokens=True)
        if cur.startswith(prev):
            pieces.append(cur[len(prev):])
        else:  # a decoder that rewrites earlier text (rare): fall back to the token alone
            pieces.append(tokenizer.decode([ids[i]], skip_special_tokens=True))
        prev = cur
    return pieces


# ------------------------------------------------------------------------------------------------------------------
def student_dir(run_dir: Path, cfg: Config | None = None) -> Path:
    """The run's trained student: ``models/final`` when its config ran phase 2 (``rl.enabled``), else
    ``models/phase1`` — never the other one in its place. Checked against the run's manifest (every recorded file
    present with its size and hash); raises :class:`~tw_rl.manifest.ArtefactError` naming the missing or corrupt
    file."""
    from tw_rl.manifest import Manifest

    run_dir = Path(run_dir)
    if cfg is None:
        cfg = load_config(RunDir(run_dir).config)
    name = RunDir.trained_student_name(cfg.rl.enabled)
    d = RunDir(run_dir).model(name)
    manifest = Manifest(run_dir)
    if manifest.entry(f"{name}_student") is not None:
        manifest.verify(f"{name}_student")
    elif not (d / "tw_student.json").is_file():  # a run written before the manifest, or one not finished
        raise ArtefactError(f"{d / 'tw_student.json'} is missing: {run_dir} has no trained student in models/{name}"
                            f" (its config has rl.enabled={cfg.rl.enabled}); train it first (tw-rl train / "
                            f"tw-rl demo), or --resume an interrupted run")
    return d


def load(run_dir: str | Path, device: str | torch.device = "cpu", overrides: Sequence[str] = ()) -> TrainedModel:
    """Load a run written by ``tw-rl train``/``tw-rl demo``: its config (``config.yaml``, with ``overrides`` such
    as ``eval.batch_size=64``), trained student, teacher and tokenizer. Models are put on ``device``. Every file
    the run's manifest records for them is checked first: a missing, truncated or corrupt one is an
    :class:`~tw_rl.manifest.ArtefactError` naming it."""
    from tw_rl.manifest import Manifest
    from tw_rl.models.factory import load_model

    run = Path(run_dir)
    if not RunDir(run).config.is_file():
        raise FileNotFoundError(f"{run} is not a tw-rl run directory (no config.yaml)")
    cfg = load_config(RunDir(run).config, list(overrides))
    manifest = Manifest(run)
    for role in ("teacher", "student"):
        if getattr(cfg, role).name_or_path is None and manifest.entry(role) is not None:
            manifest.verify(role)
    teacher_dir = cfg.teacher.name_or_path or RunDir(run).model("teacher")
    base_dir = cfg.student.name_or_path or RunDir(run).model("student")
    student, _ = Student.load(student_dir(run, cfg), trust_remote_code=cfg.student.trust_remote_code)
    model, tok = load_model(str(teacher_dir), trust_remote_code=cfg.teacher.trust_remote_code,
                            gguf_file=cfg.teacher.gguf_file)
    teacher = Teacher(model, vocab_size=len(tok), pad_id=tok.pad_token_id,
                      start_id=start_token_id(model, tok.pad_token_id), device=device,
                      stack_caches=cfg.teacher.stack_caches, reuse_prefixes=cfg.teacher.reuse_prefixes)
    return TrainedModel(cfg, tok, student, teacher, base_student_dir=base_dir, device=device)
