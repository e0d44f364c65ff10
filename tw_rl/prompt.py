"""The budget prompt: the natural-language prefix that tells the student its teacher budget (SPEC §2).

The student's input is ``budget_prompt(template, b) + x``; the teacher's is ``x`` alone. One function, so that the
prompts the student is trained on, the ones its length limit counts (:func:`tw_rl.config.prompt_tokens`) and the
ones a deployed model writes (:meth:`tw_rl.api.TrainedModel.examples`) are the same text.
"""


def budget_prompt(template: str, budget: float) -> str:
    """``template`` (config ``budget_prompt``, e.g. ``"teacher budget {pct}%: "``) at ``budget``, in whole percent
    (rounded: 0.29 is 29 %)."""
    return template.format(pct=int(round(100 * budget)))
