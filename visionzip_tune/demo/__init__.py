"""What ``bash train.sh`` builds for the CPU demo, and what tests and benches reuse: tiny random models of every
family with a local tokenizer (:mod:`.tiny`) and the synthetic shapes dataset (:mod:`.dataset`)."""
