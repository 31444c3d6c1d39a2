def test_hard_split_is_three_digit_disjoint_and_worked():
    from alignflow.data.task import extract_answer, hard_split
    split = hard_split(seed=3, n_train=50, n_eval=20, exclude={"123+456=?"})
    train, held = split["train"], split["eval"]
    prompts = [r["prompt"] for r in train + held]
    assert len(train) == 50 and len(held) == 20 and len(set(prompts)) == 70 and "123+456=?" not in prompts
    for row in train + held:
        a, b = (int(x) for x in row["prompt"].removesuffix("=?").split("+"))
        assert 100 <= a <= 999 and 100 <= b <= 999
        assert extract_answer(row["response"]) == row["answer"] == str(a + b)
    assert hard_split(seed=3, n_train=50, n_eval=20) == hard_split(seed=3, n_train=50, n_eval=20)
