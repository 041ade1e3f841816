"""Tasks: answer checking, check functions, coercion and JSONL loading."""

import json

import pytest

from lifecycle_agent import Task
from lifecycle_agent.errors import TaskFormatError
from lifecycle_agent.tasks import coerce_task, extract_answer, iter_tasks, load_tasks_jsonl, normalise_answer


@pytest.mark.parametrize(
    "reply,expected",
    [("Answer: Paris", "Paris"), ("thinking\nanswer = 42\n", "42"), ("**Answer:** blue.", "blue."), ("just this", "just this")],
)
def test_extract_answer(reply, expected):
    assert extract_answer(reply) == expected


def test_normalise_ignores_case_spacing_and_punctuation():
    assert normalise_answer("  The  Eiffel Tower. ") == normalise_answer("the eiffel tower")


def test_task_answer_match_gives_reward_one_and_feedback():
    result = Task(prompt="capital of France?", answer="Paris").step("I think...\nAnswer: paris")
    assert result.reward == 1.0 and result.done and "Correct" in result.feedback


def test_task_wrong_answer_gives_zero_and_reveals_answer():
    result = Task(prompt="q", answer="Paris").step("Answer: Rome")
    assert result.reward == 0.0 and "Rome" in result.feedback and "Paris" in result.feedback


def test_task_wrong_answer_can_hide_the_answer():
    result = Task(prompt="q", answer="Paris", reveal_answer=False).step("Answer: Rome")
    assert "Paris" not in result.feedback


@pytest.mark.parametrize(
    "returned,reward,feedback",
    [(True, 1.0, "Correct."), (False, 0.0, "Wrong."), (0.25, 0.25, "Reward 0.25."), ((0.5, "half right"), 0.5, "half right")],
)
def test_task_check_function_results(returned, reward, feedback):
    result = Task(prompt="q", check=lambda answer: returned).step("Answer: x")
    assert result.reward == reward and result.feedback == feedback


def test_check_receives_the_extracted_answer():
    seen = []
    Task(prompt="q", check=lambda a: seen.append(a) or True).step("blah\nAnswer: 7")
    assert seen == ["7"]


@pytest.mark.parametrize("returned", ["yes", float("nan"), (1.0, "a", "b")])
def test_bad_check_results_are_clear_errors(returned):
    with pytest.raises(TaskFormatError, match="check returned"):
        Task(prompt="q", check=lambda a: returned).step("x")


def test_task_without_verifier_has_no_reward():
    result = Task(prompt="write a haiku").step("leaves fall")
    assert result.reward is None and result.feedback is None and result.done


def test_task_refuses_answer_and_check_together():
    with pytest.raises(ValueError, match="either answer or check"):
        Task(prompt="q", answer="a", check=lambda a: True)


def test_task_refuses_blank_prompt():
    with pytest.raises(ValueError, match="prompt"):
        Task(prompt="   ")


def test_coerce_strings_and_dicts_get_stable_ids():
    a = coerce_task("hello", 0)
    b = coerce_task("hello", 0)
    c = coerce_task({"prompt": "hi", "answer": "1"}, 1)
    assert a.id == b.id and a.id.startswith("t1-") and c.answer == "1" and c.id.startswith("t2-")


def test_coerce_rejects_unknown_fields_with_position():
    with pytest.raises(TaskFormatError, match="item 3: unknown field 'promt'"):
        coerce_task({"promt": "typo"}, 2)


def test_coerce_rejects_other_types():
    with pytest.raises(TaskFormatError, match="got int"):
        coerce_task(5, 0)


def test_iter_tasks_refuses_repeated_ids():
    with pytest.raises(TaskFormatError, match="appears twice"):
        list(iter_tasks([Task(prompt="a", id="x"), Task(prompt="b", id="x")]))


def _write(tmp_path, lines):
    path = tmp_path / "tasks.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_load_jsonl_reads_objects_and_bare_prompts(tmp_path):
    path = _write(tmp_path, [json.dumps({"prompt": "a", "answer": "1", "id": "first"}), "", json.dumps("just a prompt")])
    tasks = load_tasks_jsonl(path)
    assert [t.id for t in tasks][0] == "first" and tasks[1].prompt == "just a prompt" and tasks[1].id.startswith("line3-")


def test_load_jsonl_ids_from_line_and_content_are_stable(tmp_path):
    path = _write(tmp_path, [json.dumps({"prompt": "a"})])
    assert load_tasks_jsonl(path)[0].id == load_tasks_jsonl(path)[0].id


def test_load_jsonl_malformed_line_names_file_and_line(tmp_path):
    path = _write(tmp_path, [json.dumps({"prompt": "ok"}), '{"prompt": "broken"'])
    with pytest.raises(TaskFormatError, match=r"tasks.jsonl:2: invalid JSON"):
        load_tasks_jsonl(path)


def test_load_jsonl_missing_prompt_names_line(tmp_path):
    path = _write(tmp_path, [json.dumps({"answer": "1"})])
    with pytest.raises(TaskFormatError, match=r":1: missing field 'prompt'"):
        load_tasks_jsonl(path)


def test_load_jsonl_non_object_line_is_an_error(tmp_path):
    with pytest.raises(TaskFormatError, match=r":1: expected a JSON object"):
        load_tasks_jsonl(_write(tmp_path, ["[1, 2]"]))


def test_load_jsonl_duplicate_id_names_both_lines(tmp_path):
    path = _write(tmp_path, [json.dumps({"prompt": "a", "id": "x"}), json.dumps({"prompt": "b", "id": "x"})])
    with pytest.raises(TaskFormatError, match=r":2: task id 'x' repeats the id on line 1"):
        load_tasks_jsonl(path)


def test_load_jsonl_missing_file_and_empty_file(tmp_path):
    with pytest.raises(TaskFormatError, match="does not exist"):
        load_tasks_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(TaskFormatError, match="holds no tasks"):
        load_tasks_jsonl(_write(tmp_path, [""]))


def test_load_jsonl_keeps_unicode_line_separators_inside_strings(tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_text(json.dumps({"prompt": "a\u2028b", "id": "x"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert load_tasks_jsonl(path)[0].prompt == "a\u2028b"


def test_numeric_answer_and_id_are_read_as_text():
    task = Task(prompt="code?", answer=417, id=7)
    assert (task.answer, task.id) == ("417", "7")
    assert task.step("Answer: 417").reward == 1.0
    assert Task(prompt="half?", answer=0.5).answer == "0.5"


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("answer", True, "field 'answer': must be a string or a number, got bool"),
        ("id", False, "field 'id': must be a string or a number, got bool"),
        ("answer", ["4"], "field 'answer': must be a string or a number, got list"),
        ("answer", float("nan"), "field 'answer': must be a string or a finite number"),
    ],
)
def test_other_answer_and_id_types_are_clear_errors(field, value, match):
    with pytest.raises(TaskFormatError, match=match):
        coerce_task({"prompt": "q", field: value}, 0)


def test_load_jsonl_accepts_numbers_as_answer_and_id(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"prompt": "What is 2+2?", "answer": 4, "id": 1}\n{"prompt": "And 3+3?", "answer": 6}\n')
    tasks = load_tasks_jsonl(path)
    assert [t.answer for t in tasks] == ["4", "6"] and tasks[0].id == "1"
    assert tasks[0].step("Answer: 4").reward == 1.0


def test_load_jsonl_ignores_a_utf8_byte_order_mark(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "hi", "id": "b1"}\r\n')
    assert [t.id for t in load_tasks_jsonl(path)] == ["b1"]
