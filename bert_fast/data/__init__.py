"""Pretraining data: raw text -> shards -> NSP pairs + MLM masks -> batches."""
