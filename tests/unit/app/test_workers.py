"""relay.app.workers' pure parts: one exposition out of several processes', exit wording."""

from __future__ import annotations

import signal

from prometheus_client.parser import text_string_to_metric_families

from relay.app.workers import describe_exit, merged_exposition
from relay.support.metrics import Metrics


def _samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


def test_every_series_is_kept_under_its_process_label() -> None:
    """Counters and histograms of two processes: each sample once, labelled, values intact."""
    primary, worker = Metrics(), Metrics()
    primary.served.labels("200").inc(3)
    worker.served.labels("200").inc(5)
    worker.served.labels("410").inc()
    worker.public_request_seconds.labels("native").observe(0.003)
    merged = merged_exposition([("primary", primary.render()), ("worker-1", worker.render())])
    samples = _samples(merged)
    served = "relay_served_requests_total"
    assert samples[(served, (("process", "primary"), ("status", "200")))] == 3
    assert samples[(served, (("process", "worker-1"), ("status", "200")))] == 5
    assert samples[(served, (("process", "worker-1"), ("status", "410")))] == 1
    assert (served, (("process", "primary"), ("status", "410"))) not in samples
    bucket = (("kind", "native"), ("le", "0.005"), ("process", "worker-1"))
    assert samples[("relay_public_request_seconds_bucket", bucket)] == 1
    # Each of the two inputs' samples is there once, nothing else.
    assert len(samples) == len(_samples(primary.render())) + len(_samples(worker.render()))


def test_one_help_and_type_line_per_family() -> None:
    """A name may have one HELP and one TYPE line: families of one name are merged."""
    merged = merged_exposition([(str(n), Metrics().render()) for n in range(3)]).decode()
    assert merged.count("# TYPE relay_served_requests_total counter\n") == 1
    assert merged.count("# HELP relay_cache_hits_total ") == 1
    assert merged.count('process_open_fds{process="2"}') == 1


def test_exit_descriptions() -> None:
    """An exit code or the signal's name, as asyncio reports them (negative: a signal)."""
    assert describe_exit(5) == "exit code 5"
    assert describe_exit(0) == "exit code 0"
    assert describe_exit(-signal.SIGKILL) == "signal SIGKILL"
    assert describe_exit(-200) == "signal 200"
