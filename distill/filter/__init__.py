"""The filter stage: raw shards -> clean shards that hold only traces worth learning from.

- :mod:`~distill.filter.stage`: the stage (per domain: verify, drop, dedup, decontaminate, select)
- :mod:`~distill.filter.steps`: the steps as pure functions over lists of traces
- :mod:`~distill.filter.report`: the funnel, as JSON and Markdown
- :mod:`~distill.filter.dedup`, :mod:`~distill.filter.decontam`, :mod:`~distill.filter.texthash`:
  near-duplicate and n-gram overlap detection
"""

from distill.filter.stage import filter_domain, filter_traces, run

__all__ = ["filter_domain", "filter_traces", "run"]
