"""Things alignkit ships so that a job runs offline: a tiny model, its tokenizer, a learnable dataset."""
