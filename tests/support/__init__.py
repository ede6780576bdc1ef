"""What the tests need besides the code under test, and what bench/ reuses: no test lives here.

    harness.py        tiny hub-free models, tokenizers, data and configs; the kill harness (fork or subprocess)
    fixtures.py       the builders the tests use by name, and atkd_here (the CLI in this process)
    architectures.py  tiny random-weight models of each output-head architecture
    synthetic.py      synthetic caches and shards (no model)
    s3.py             a local S3 server (moto on 127.0.0.1) and a flaky proxy in front of it
    target_kl.py      KL from the exact top-k target to a decoded (lossy) one, in float64

bench/ imports these (one copy of each builder); nothing here imports bench/ or a test module.
"""
