"""The embedded demo: a generated instruction task (task.py), its tokenizer
(tokenizer.py) and a small teacher trained on first use (teacher.py), so
`atkd run` works end to end with no download and no GPU."""
