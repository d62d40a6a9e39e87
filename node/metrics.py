"""Prometheus metrics (`GET /metrics`).

Two kinds:

- **events counted in this process** (counters and histograms, updated where
  the thing happens): instances received, bytes, rejects by reason,
  associations, stage latency, inference batches, deliveries by destination
  and outcome. They restart from zero with the process, as Prometheus
  counters do (`rate()` handles resets);
- **state read from the database at scrape time** (`NodeCollector`):
  studies by state, queue depth and oldest pending age per stage, dead
  letters, plus the running model and free storage. Read at scrape, they are
  right across restarts and across several nodes sharing one database.

Each node has its own registry (not prometheus-client's global one), so
several nodes in one test process never share counters. No label carries
PHI: states, stages, destination names and reasons from a fixed set.
"""
from __future__ import annotations

import gc
import logging
import os
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from node.context import NodeContext

log = logging.getLogger(__name__)

# No `*_created` series: they double the output and no dashboard here uses them.
disable_created_metrics()

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.instances_received = Counter(
            "carina_instances_received", "C-STORE instances acknowledged, by what they were: "
            "new, duplicate (same bytes again: nothing else happens) or changed (new bytes under a known SOP UID)",
            ["outcome"], registry=r)
        self.received_bytes = Counter("carina_received_bytes", "Bytes of acknowledged new or changed instances",
                                      registry=r)
        self.instances_rejected = Counter("carina_instances_rejected", "C-STORE requests refused, by reason",
                                          ["reason"], registry=r)
        self.associations = Counter("carina_associations", "DICOM associations accepted by the SCP", registry=r)
        self.associations_active = Gauge("carina_associations_active", "DICOM associations open now", registry=r)
        self.gc_frozen = Gauge("carina_gc_frozen_objects", "Objects built at start-up that the garbage collector "
                               "no longer scans (node/service.py freeze_start_up_heap)", registry=r)
        self.gc_frozen.set_function(gc.get_freeze_count)
        self.stage_seconds = Histogram("carina_stage_duration_seconds", "Pipeline stage run time, by stage and outcome",
                                       ["stage", "outcome"], buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("carina_inference_batch_size", "Images per inference forward pass",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.batch_seconds = Histogram("carina_inference_batch_seconds", "Forward pass (plus CAMs) time per batch",
                                       buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r)
        self.deliveries = Counter("carina_deliveries", "Delivery attempts by destination, stage (deliver: the "
                                  "report's objects or message; deliver-sc: the SCs) and outcome (delivered, retry, dead)",
                                  ["destination", "stage", "outcome"], registry=r)
        self.purged = Counter("carina_retention_purged", "Rows and files removed by retention, by kind",
                              ["kind"], registry=r)

    def bind(self, ctx: "NodeContext") -> None:
        """Add the scrape-time collector of the node's database, model and storage."""
        self.registry.register(NodeCollector(ctx))

    # Callbacks handed to the parts that must not import node/ (the SCP, the batcher).
    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)


class NodeCollector(Collector):
    def __init__(self, ctx: "NodeContext"):
        self.ctx = ctx

    def describe(self):
        return []  # collected at scrape only: never query the database at registration

    def collect(self):
        from node import ops_queries

        ctx = self.ctx
        try:
            snap = ops_queries.snapshot(ctx.db, ctx.settings)
        except Exception as exc:  # the scrape still answers; /readyz says the database is down
            log.warning("metrics: database unavailable (%s)", type(exc).__name__)
            snap = None
        if snap is not None:
            studies = GaugeMetricFamily("carina_studies", "Studies by state", labels=["state"])
            for state, count in sorted(snap.studies_by_state.items()):
                studies.add_metric([state], count)
            yield studies
            depth = GaugeMetricFamily("carina_queue_depth", "Jobs by stage and state", labels=["stage", "state"])
            for (stage, state), count in sorted(snap.jobs_by_stage_state.items()):
                depth.add_metric([stage, state], count)
            yield depth
            oldest = GaugeMetricFamily("carina_queue_oldest_pending_age_seconds",
                                       "Age of the oldest pending job per stage (0 when none)", labels=["stage"])
            for stage, age in sorted(snap.oldest_pending_age.items()):
                oldest.add_metric([stage], age)
            yield oldest
            dead = GaugeMetricFamily("carina_dead_letter_jobs", "Dead-letter jobs by stage and destination",
                                     labels=["stage", "destination"])
            for (stage, destination), count in sorted(snap.dead_letters.items()):
                dead.add_metric([stage, destination], count)
            yield dead
            yield GaugeMetricFamily("carina_dead_letter_oldest_age_seconds",
                                    "How long the oldest dead-letter job has been dead (0 when none)",
                                    value=snap.oldest_dead_age)
        info = ctx.model_info
        model = GaugeMetricFamily("carina_model_info", "The model the node runs (value 1)",
                                  labels=["name", "version", "demo"])
        if info is not None:
            model.add_metric([info.name, info.version, "true" if info.demo else "false"], 1)
        yield model
        try:
            stat = os.statvfs(ctx.data_dir)
            yield GaugeMetricFamily("carina_storage_free_bytes", "Free bytes on the storage filesystem",
                                    value=stat.f_bavail * stat.f_frsize)
        except OSError:
            pass
