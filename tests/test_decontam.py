"""n-gram decontamination (distill.filter.decontam) on hand-made and on generated tasks."""

from __future__ import annotations

from distill.filter.decontam import EvalText, NgramIndex, canonical, eval_texts, words_text
from teachers.base import get_domain

LONG = (
    "A farmer has 17 sheep and buys 23 more at the market on Tuesday, then sells 9 of "
    "them to a neighbour who keeps goats. How many sheep does the farmer have left now?"
)


def _index(texts, **kw):
    evals = [
        EvalText(f"t{i}", "math", t, "prompt", canonical({"answer": i}))
        for i, t in enumerate(texts)
    ]
    return NgramIndex(evals, **kw)


def test_tokens_keep_punctuation_apart():
    assert words_text("Evaluate: T and (F or T)") == "evaluate : t and ( f or t )"
    assert words_text("3+4") == words_text("3 + 4")


def test_copied_and_embedded_eval_text_is_found_paraphrase_template_is_not():
    idx = _index([LONG, "What is 752 + 404?"])
    train = [
        LONG,  # copied
        "Please solve this. " + LONG + " Show your work.",  # embedded
        LONG.replace("17 sheep", "31 sheep").replace("sells 9", "sells 4"),  # template sibling
        "what is 752+404 ?",  # short prompt, equal up to case and spacing
        "What is 752 + 405?",
        "",
    ]
    assert idx.contaminated(train, [None] * len(train)).tolist() == [0, 0, -1, 1, -1, -1]


def test_overlap_zero_is_the_classic_any_ngram_rule():
    sibling = LONG.replace("17 sheep", "31 sheep").replace("sells 9", "sells 4")
    assert _index([LONG], overlap=0.0).contaminated([sibling]).tolist() == [0]
    assert _index([LONG], overlap=0.8).contaminated([sibling]).tolist() == [-1]


def test_same_prompt_other_reference_is_another_task():
    idx = _index([LONG])
    assert idx.contaminated([LONG], [canonical({"answer": 0})]).tolist() == [0]
    assert idx.contaminated([LONG], [canonical({"answer": 99})]).tolist() == [-1]


def test_short_answers_are_not_compared():
    evals = [EvalText("t0", "math", "1156", "reference")]
    idx = NgramIndex(evals)
    assert idx.contaminated(["\\boxed{1156}", "1156"]).tolist() == [-1, -1]


def test_boilerplate_ngrams_do_not_count():
    tail = " Give the final answer as an integer and nothing else please ."
    evals = [f"Compute {i} times {i + 3}." + tail for i in range(40)]
    idx = _index(evals, boilerplate=0.05, overlap=0.8)
    assert idx.excluded > 0
    # the template alone, or the template with other numbers, flags nothing
    assert idx.contaminated(["Compute 500 times 7." + tail]).tolist() == [-1]
    assert idx.contaminated([evals[5]]).tolist() == [5]


def test_generated_train_tasks_are_not_flagged_eval_tasks_are():
    """On real generated tasks the defaults flag (almost) no train task and every eval
    task: template wording shared across the hash split is not contamination."""
    for name in ("math", "logic", "agents", "code"):
        dom = get_domain(name)
        ev = list(dom.tasks("eval", 60, 0, 2))
        idx = NgramIndex(eval_texts(ev, name))
        train = list(dom.tasks("train", 200, 0, 2))

        def prompts(ts):  # every user turn, as a trace of the task holds them
            users = [[m["content"] for m in t.messages if m["role"] == "user"] for t in ts]
            return ["\n".join(u + list(t.followups)) for u, t in zip(users, ts, strict=True)]

        hits = idx.contaminated(prompts(train), [canonical(t.reference) for t in train])
        assert (hits >= 0).mean() <= 0.01, name
        again = idx.contaminated(prompts(ev), [canonical(t.reference) for t in ev])
        assert (again >= 0).all(), name


def test_answer_reproducing_an_eval_reference_is_found():
    code = get_domain("code")
    ev = list(code.tasks("eval", 20, 0, 2))
    idx = NgramIndex(eval_texts(ev, "code"))
    solution = code.oracle(ev[0])[-1]["content"]
    leaked = solution + "\n" + "\n".join(ev[0].reference["tests"])  # the eval tests, verbatim
    hits = idx.contaminated([solution, leaked])
    assert hits[0] == -1
    assert idx.evals[hits[1]].task_id == ev[0].id and idx.evals[hits[1]].kind == "reference"
