"""Shipping run records to Elasticsearch and OpenSearch.

No Elasticsearch or OpenSearch server can be installed where this suite runs, so
these tests drive the real async clients (``elasticsearch`` and ``opensearch-py``)
against tests/unit/search_standin.py, a stand-in server on 127.0.0.1. It
implements the few endpoints that the shipper uses, with responses in the shape of
the real servers' ones, and fails on demand. The stand-in cannot show how a real
cluster maps and stores the documents, so the index template is checked as data.

Run events come from a real RunManager and SQLite run store where the test is about
the documents, and are built by hand where it is about delivery.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import logging
import ssl
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

import pytest
from search_standin import SearchStandin

from saltpeter import shipping
from saltpeter.config import Settings, parse_job
from saltpeter.manager import RunManager
from saltpeter.protocol import Complete, Output, Start
from saltpeter.runs import SkipReason, Trigger
from saltpeter.shipping import (
    ClusterUrl,
    Document,
    ElasticsearchBackend,
    OpenSearchBackend,
    SearchBackend,
    Shipper,
    Spool,
)
from saltpeter.store import RunStore

T = TypeVar("T")

PRODUCTS = ("elasticsearch", "opensearch")
WAIT_SECONDS = 20.0
FAST_RETRY = {"retry_base": 0.05, "retry_cap": 0.2}
NOW = datetime(2026, 12, 4, 12, 0, tzinfo=timezone.utc)
SLOT = datetime(2026, 12, 4, 12, 5, tzinfo=timezone.utc)
SECRET_ENV = "env-value-7c1d"


class RecordedEvents:
    """The Salt event bus side of the run manager, which needs a running master."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def fire(self, tag: str, data: dict[str, Any]) -> None:
        self.events.append((tag, data))


def run(make: Callable[[], Coroutine[Any, Any, T]], timeout: float = 90.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(make(), timeout)

    return asyncio.run(bounded())


async def wait_until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {WAIT_SECONDS:g} s waiting for {what}")
        await asyncio.sleep(0.02)


def make_backend(
    product: str,
    url: str,
    *,
    username: str | None = None,
    password: str | None = None,
    api_key: str | None = None,
    ca_certs: str | None = None,
    request_timeout: float = shipping.DEFAULT_REQUEST_TIMEOUT,
) -> SearchBackend:
    parsed = shipping.parse_cluster_url(url)
    if username is not None:
        parsed = ClusterUrl(parsed.url, username, password)
    masked = shipping.mask_url(url)
    if product == "elasticsearch":
        return ElasticsearchBackend(
            parsed, masked, api_key=api_key, ca_certs=ca_certs, request_timeout=request_timeout
        )
    return OpenSearchBackend(parsed, masked, ca_certs=ca_certs, request_timeout=request_timeout)


def make_shipper(
    server: SearchStandin,
    spool_dir: Path,
    *,
    url: str | None = None,
    output_of: Callable[[str, str], str] = lambda run_id, minion: f"output of {minion}\n",
    group_of: Callable[[str], str | None] = lambda job: "jobs",
    request_timeout: float = shipping.DEFAULT_REQUEST_TIMEOUT,
    backend: SearchBackend | None = None,
    **options: Any,
) -> Shipper:
    if backend is None:
        backend = make_backend(server.product, url or server.url, request_timeout=request_timeout)
    settings = {**FAST_RETRY, **options}
    return Shipper(backend, "saltpeter", spool_dir, output_of, group_of, **settings)


def job_start(run_id: str, job: str = "backup") -> tuple[str, dict[str, Any]]:
    data = {
        "job": job,
        "run_id": run_id,
        "trigger": "schedule",
        "scheduled": "2026-12-04T12:05:00+00:00",
        "targets": ["m1"],
        "maintenance": [],
    }
    return f"saltpeter/job/{job}/start", data


def minion_result(run_id: str, minion: str, retcode: int = 0) -> tuple[str, dict[str, Any]]:
    data = {
        "job": "backup",
        "run_id": run_id,
        "minion": minion,
        "retcode": retcode,
        "reason": "exit",
        "output_tail": "",
    }
    return f"saltpeter/job/backup/{minion}/complete", data


def emit(shipper: Shipper, events: list[tuple[str, dict[str, Any]]]) -> None:
    for tag, data in events:
        shipper.on_event(tag, data)


def bulk_requests(server: SearchStandin) -> int:
    return len(server.requests(path="/_bulk"))


@pytest.fixture
def servers() -> Iterator[Callable[..., SearchStandin]]:
    started: list[SearchStandin] = []

    def start(product: str = "elasticsearch", **options: Any) -> SearchStandin:
        server = SearchStandin(product, **options)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(params=PRODUCTS)
def product(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def server(servers: Callable[..., SearchStandin], product: str) -> SearchStandin:
    return servers(product)


# --------------------------------------------------------------- pure functions


class TestRetryDelay:
    def test_first_failure_waits_base(self) -> None:
        assert shipping.retry_delay(1, 1.0, 60.0) == 1.0

    def test_wait_doubles(self) -> None:
        delays = [shipping.retry_delay(failures, 1.0, 60.0) for failures in (1, 2, 3, 4)]
        assert delays == [1.0, 2.0, 4.0, 8.0]

    def test_wait_stops_at_cap(self) -> None:
        assert shipping.retry_delay(7, 1.0, 60.0) == 60.0

    def test_huge_failure_count_stays_at_cap(self) -> None:
        assert shipping.retry_delay(10_000, 1.0, 60.0) == 60.0


class TestRetryableStatus:
    @pytest.mark.parametrize("status", [None, 401, 403, 408, 429, 500, 502, 503, 504])
    def test_request_retried(self, status: int | None) -> None:
        assert shipping.request_is_retryable(status)

    @pytest.mark.parametrize("status", [400, 404, 413])
    def test_request_not_retried(self, status: int) -> None:
        assert not shipping.request_is_retryable(status)

    @pytest.mark.parametrize("status", [429, 500, 503])
    def test_item_retried(self, status: int) -> None:
        assert shipping.item_is_retryable(status)

    @pytest.mark.parametrize("status", [400, 404, 409])
    def test_item_not_retried(self, status: int) -> None:
        assert not shipping.item_is_retryable(status)


class TestUrls:
    def test_mask_hides_user_and_password(self) -> None:
        masked = shipping.mask_url("https://elastic:pa55@es.example:9200/prefix")
        assert masked == "https://***@es.example:9200/prefix"

    def test_mask_without_scheme(self) -> None:
        assert shipping.mask_url("elastic:pa55@es.example:9200") == "***@es.example:9200"

    def test_mask_password_with_slash(self) -> None:
        masked = shipping.mask_url("http://elastic:pa/55@es.example:9200")
        assert masked == "http://***@es.example:9200"

    def test_mask_leaves_plain_url(self) -> None:
        assert shipping.mask_url("http://es.example:9200") == "http://es.example:9200"

    def test_parse_splits_credentials(self) -> None:
        parsed = shipping.parse_cluster_url("https://elastic:p%40ss@es.example:9201")
        assert parsed.url == "https://es.example:9201"
        assert parsed.username == "elastic"
        assert parsed.password == "p@ss"

    def test_parse_defaults_http_port_9200(self) -> None:
        assert shipping.parse_cluster_url("http://es.example").url == "http://es.example:9200"

    def test_parse_defaults_https_port_443(self) -> None:
        assert shipping.parse_cluster_url("https://es.example").url == "https://es.example:443"

    def test_parse_keeps_ipv6_brackets(self) -> None:
        assert shipping.parse_cluster_url("http://[::1]:9200").url == "http://[::1]:9200"

    def test_parse_keeps_path_prefix(self) -> None:
        parsed = shipping.parse_cluster_url("http://proxy.example:80/search/")
        assert parsed.url == "http://proxy.example:80/search"

    def test_parse_error_masks_credentials(self) -> None:
        with pytest.raises(ValueError) as caught:
            shipping.parse_cluster_url("ftp://elastic:hunter2@es.example")
        assert "hunter2" not in str(caught.value)

    def test_parse_rejects_bad_port(self) -> None:
        with pytest.raises(ValueError, match="port"):
            shipping.parse_cluster_url("http://es.example:notaport")

    def test_repr_hides_credentials(self) -> None:
        parsed = shipping.parse_cluster_url("http://elastic:hunter2@es.example:9200")
        assert "hunter2" not in repr(parsed)


class TestIndexNames:
    def test_daily_index_uses_utc_date(self) -> None:
        instant = datetime.fromisoformat("2024-03-01T00:30:00+02:00")
        assert shipping.index_name("saltpeter", instant) == "saltpeter-2024.02.29"

    def test_timestamp_is_utc_with_milliseconds(self) -> None:
        instant = datetime.fromisoformat("2024-03-01T00:30:00.123456+02:00")
        assert shipping.format_timestamp(instant) == "2024-02-29T22:30:00.123Z"

    @pytest.mark.parametrize("prefix", ["saltpeter", "cron.history", "sp-prod_1"])
    def test_prefix_accepted(self, prefix: str) -> None:
        assert shipping.check_index_prefix(prefix) is None

    @pytest.mark.parametrize(
        "prefix", ["", "Saltpeter", "salt peter", "a/b", "_hidden", "-x", "a*", "a+b", ".."]
    )
    def test_prefix_rejected(self, prefix: str) -> None:
        assert shipping.check_index_prefix(prefix) is not None


class TestDocumentIds:
    def test_same_inputs_same_id(self) -> None:
        first = shipping.document_id("backup_1", "m1", "machine_result")
        second = shipping.document_id("backup_1", "m1", "machine_result")
        assert first == second

    def test_id_names_run_minion_and_type(self) -> None:
        assert (
            shipping.document_id("backup_1", "m1", "machine_start") == "backup_1/m1/machine_start"
        )

    def test_run_level_id_has_no_minion(self) -> None:
        assert shipping.document_id("backup_1", "", "job_end") == "backup_1/job_end"

    def test_long_id_is_hashed_to_fit(self) -> None:
        doc_id = shipping.document_id("r" * 600, "m1", "job_start")
        assert len(doc_id) == 64


class TestMessageTypes:
    @pytest.mark.parametrize(
        ("tag", "expected"),
        [
            ("saltpeter/job/backup/start", "job_start"),
            ("saltpeter/job/backup/m1/start", "machine_start"),
            ("saltpeter/job/backup/m1/complete", "machine_result"),
            ("saltpeter/job/backup/complete", "job_end"),
            ("saltpeter/job/backup/skipped", "skipped"),
            ("saltpeter/job/backup/missed", "missed"),
            ("saltpeter/request/status", None),
            ("saltpeter/job/backup/m1/heartbeat", None),
            ("salt/job/123/ret/m1", None),
        ],
    )
    def test_tag_maps_to_msg_type(self, tag: str, expected: str | None) -> None:
        assert shipping.message_type(tag) == expected


class TestIndexTemplate:
    def test_pattern_covers_daily_indices(self) -> None:
        assert shipping.index_template("saltpeter")["index_patterns"] == ["saltpeter-*"]

    def test_maps_every_documented_field(self) -> None:
        properties = shipping.index_template("saltpeter")["template"]["mappings"]["properties"]
        documented = {"job_name", "group", "job_instance", "@timestamp", "machine"}
        documented |= {"return_code", "output", "msg_type"}
        assert documented <= properties.keys()

    def test_timestamp_is_date(self) -> None:
        properties = shipping.index_template("saltpeter")["template"]["mappings"]["properties"]
        assert properties["@timestamp"] == {"type": "date"}

    def test_docs_show_installed_template(self) -> None:
        text = (Path(__file__).parents[2] / "docs" / "elasticsearch.md").read_text()
        after = text.split("with this `saltpeter-template.json`", 1)[1]
        block = after.split("```json\n", 1)[1].split("```", 1)[0]
        assert json.loads(block) == shipping.index_template("saltpeter")


# --------------------------------------------------------------------- spool


def spool_document(number: int) -> Document:
    return Document.create("saltpeter-2026.12.04", f"run_{number}/job_start", {"n": number})


class TestSpool:
    def test_documents_come_back_in_order(self, tmp_path: Path) -> None:
        spool = Spool(tmp_path / "spool", 1_000_000, 100_000)
        spool.load()
        spool.append([spool_document(1), spool_document(2)])
        spool.append([spool_document(3)])
        _, documents, _ = spool.read_head()
        assert [document.source["n"] for document in documents] == [1, 2, 3]

    def test_sealed_head_takes_no_appends(self, tmp_path: Path) -> None:
        spool = Spool(tmp_path / "spool", 1_000_000, 100_000)
        spool.load()
        spool.append([spool_document(1)])
        head, _, _ = spool.read_head()
        spool.append([spool_document(2)])
        assert head is not None
        spool.remove(head)
        _, documents, _ = spool.read_head()
        assert [document.source["n"] for document in documents] == [2]

    def test_replace_keeps_only_given_documents(self, tmp_path: Path) -> None:
        spool = Spool(tmp_path / "spool", 1_000_000, 100_000)
        spool.load()
        spool.append([spool_document(1), spool_document(2), spool_document(3)])
        head, _, _ = spool.read_head()
        assert head is not None
        spool.replace(head, [spool_document(2)])
        _, documents, _ = spool.read_head()
        assert [document.source["n"] for document in documents] == [2]

    def test_count_follows_replace(self, tmp_path: Path) -> None:
        spool = Spool(tmp_path / "spool", 1_000_000, 100_000)
        spool.load()
        spool.append([spool_document(1), spool_document(2), spool_document(3)])
        head, _, _ = spool.read_head()
        assert head is not None
        spool.replace(head, [spool_document(2)])
        assert spool.documents == 1

    def test_load_finds_earlier_segments(self, tmp_path: Path) -> None:
        first = Spool(tmp_path / "spool", 1_000_000, 100_000)
        first.load()
        first.append([spool_document(1), spool_document(2)])
        second = Spool(tmp_path / "spool", 1_000_000, 100_000)
        assert second.load() == 2

    def test_bound_drops_oldest_segments(self, tmp_path: Path) -> None:
        size = len(spool_document(10).payload)  # the same for numbers 10 to 99
        spool = Spool(tmp_path / "spool", size * 10, size)  # one document per segment
        spool.load()
        dropped = sum(spool.append([spool_document(number)]) for number in range(10, 25))
        _, documents, _ = spool.read_head()
        assert dropped == 5
        assert documents[0].source["n"] == 15

    def test_bound_holds_after_drops(self, tmp_path: Path) -> None:
        size = len(spool_document(10).payload)
        spool = Spool(tmp_path / "spool", size * 10, size)
        spool.load()
        for number in range(10, 25):
            spool.append([spool_document(number)])
        assert spool.size <= size * 10

    def test_half_written_record_is_skipped(self, tmp_path: Path) -> None:
        spool = Spool(tmp_path / "spool", 1_000_000, 100_000)
        spool.load()
        spool.append([spool_document(1)])
        segment_path = next((tmp_path / "spool").iterdir())
        with segment_path.open("ab") as stream:
            stream.write(b'{"index":{"_index":"saltpeter-2026.12.04","_id":"x"}}\n{"n":')
        reloaded = Spool(tmp_path / "spool", 1_000_000, 100_000)
        reloaded.load()
        _, documents, damaged = reloaded.read_head()
        assert [document.source["n"] for document in documents] == [1]
        assert damaged == 1

    def test_append_after_load_starts_new_segment(self, tmp_path: Path) -> None:
        spool = Spool(tmp_path / "spool", 1_000_000, 100_000)
        spool.load()
        spool.append([spool_document(1)])
        segment_path = next((tmp_path / "spool").iterdir())
        with segment_path.open("ab") as stream:
            stream.write(b'{"index":{"_index":"saltpeter-2026.12.04","_id":"x"}}\n{"n":')
        reloaded = Spool(tmp_path / "spool", 1_000_000, 100_000)
        reloaded.load()
        reloaded.append([spool_document(2)])
        head, _, _ = reloaded.read_head()
        assert head is not None
        reloaded.remove(head)
        _, documents, damaged = reloaded.read_head()
        assert [document.source["n"] for document in documents] == [2]
        assert damaged == 0

    def test_files_readable_only_by_owner(self, tmp_path: Path) -> None:
        spool = Spool(tmp_path / "spool", 1_000_000, 100_000)
        spool.load()
        spool.append([spool_document(1)])
        segment_path = next((tmp_path / "spool").iterdir())
        assert segment_path.stat().st_mode & 0o077 == 0


# ------------------------------------------------------------------ documents


def make_job(name: str = "backup") -> Any:
    raw = {
        "min": "*/5",
        "hour": "*",
        "dom": "*",
        "mon": "*",
        "dow": "*",
        "targets": "*",
        "command": "echo hi",
        "env": {"SECRET": SECRET_ENV},
    }
    return parse_job(name, raw, Path("/etc/saltpeter/jobs.yaml"), Settings(), NOW)


def drive_one_run(manager: RunManager) -> str:
    """Run a job on two minions through the real manager: m1 returns 0, m2 returns 3."""
    run_record, _token = manager.start_run(
        make_job(), Trigger.SCHEDULE, SLOT, ["m1", "m2"], [], "jid1"
    )
    for name, retcode in (("m1", 0), ("m2", 3)):
        machine = run_record.machines[name]
        manager.on_frame(run_record, machine, Start(1, 4242, "2026-12-04T12:05:01+00:00"))
        manager.on_frame(run_record, machine, Output(2, f"hello from {name}\n"))
        manager.on_frame(run_record, machine, Complete(3, retcode, "exit", "t", None))
    return run_record.run_id


@dataclass
class ShippedRun:
    """The documents a stand-in stored for one run, with what produced them."""

    sources: dict[str, list[dict[str, Any]]]  # by msg_type, in arrival order
    indices: dict[str, list[str]]  # by msg_type, in the same order
    events: list[tuple[str, dict[str, Any]]]  # as fired on the Salt event bus
    store: RunStore
    run_id: str


class TestDocuments:
    """Every msg_type, from a run driven through the real manager and store."""

    @pytest.fixture
    def shipped(self, server: SearchStandin, tmp_path: Path) -> Iterator[ShippedRun]:
        store = RunStore(tmp_path / "sp.db")
        store.sync_jobs({"backup": {}})
        bus = RecordedEvents()
        manager = RunManager(store, bus, {"backup": make_job()}.get)

        async def scenario() -> str:
            shipper = make_shipper(
                server, tmp_path / "spool", output_of=store.output, group_of=lambda job: "jobs"
            )
            manager.observers.append(shipper)
            await shipper.start()
            run_id = drive_one_run(manager)
            manager.record_skip("backup", Trigger.SCHEDULE, SLOT, SkipReason.OVERLAP)
            shipper.on_event(
                "saltpeter/job/backup/missed",
                {"job": "backup", "scheduled": "2024-03-01T00:30:00+02:00"},
            )
            await wait_until(lambda: shipper.sent == 8, "8 documents to be stored")
            await shipper.close()
            return run_id

        run_id = run(scenario)
        shipped = ShippedRun({}, {}, bus.events, store, run_id)
        for document in server.documents():
            msg_type = document.source["msg_type"]
            shipped.sources.setdefault(msg_type, []).append(document.source)
            shipped.indices.setdefault(msg_type, []).append(document.index)
        yield shipped
        store.close()

    def test_every_msg_type_arrives(self, shipped: ShippedRun) -> None:
        counts = {msg_type: len(sources) for msg_type, sources in shipped.sources.items()}
        assert counts == {
            "job_start": 1,
            "machine_start": 2,
            "machine_result": 2,
            "job_end": 1,
            "skipped": 1,
            "missed": 1,
        }

    def test_every_document_has_documented_fields(self, shipped: ShippedRun) -> None:
        documented = {"job_name", "group", "job_instance", "@timestamp", "machine"}
        documented |= {"return_code", "output", "msg_type"}
        missing = {
            msg_type: documented - source.keys()
            for msg_type, sources in shipped.sources.items()
            for source in sources
            if documented - source.keys()
        }
        assert missing == {}

    def test_index_is_prefix_and_utc_date(self, shipped: ShippedRun) -> None:
        wrong = [
            (index, source["@timestamp"])
            for msg_type, sources in shipped.sources.items()
            for index, source in zip(shipped.indices[msg_type], sources, strict=True)
            if index != "saltpeter-" + source["@timestamp"][:10].replace("-", ".")
        ]
        assert wrong == []

    def test_group_is_job_file_name(self, shipped: ShippedRun) -> None:
        groups = {source["group"] for sources in shipped.sources.values() for source in sources}
        assert groups == {"jobs"}

    def test_job_instance_is_run_id(self, shipped: ShippedRun) -> None:
        instances = {source["job_instance"] for source in shipped.sources["machine_result"]}
        assert instances == {shipped.run_id}

    def test_result_carries_stored_output(self, shipped: ShippedRun) -> None:
        outputs = {
            source["machine"]: source["output"] for source in shipped.sources["machine_result"]
        }
        assert outputs == {
            "m1": shipped.store.output(shipped.run_id, "m1"),
            "m2": shipped.store.output(shipped.run_id, "m2"),
        }

    def test_result_output_not_empty(self, shipped: ShippedRun) -> None:
        outputs = [source["output"] for source in shipped.sources["machine_result"]]
        assert all("hello from" in output for output in outputs)

    def test_result_carries_return_code(self, shipped: ShippedRun) -> None:
        codes = {
            source["machine"]: source["return_code"] for source in shipped.sources["machine_result"]
        }
        assert codes == {"m1": 0, "m2": 3}

    def test_job_end_fails_when_a_minion_failed(self, shipped: ShippedRun) -> None:
        (job_end,) = shipped.sources["job_end"]
        assert job_end["return_code"] == 1
        assert job_end["success"] is False

    def test_machine_start_dated_by_event_time(self, shipped: ShippedRun) -> None:
        event_times = {
            shipping.format_timestamp(datetime.fromisoformat(data["time"]))
            for tag, data in shipped.events
            if shipping.message_type(tag) == "machine_start"
        }
        timestamps = {source["@timestamp"] for source in shipped.sources["machine_start"]}
        assert timestamps == event_times

    def test_skipped_carries_reason(self, shipped: ShippedRun) -> None:
        (skipped,) = shipped.sources["skipped"]
        assert skipped["reason"] == "overlap"

    def test_missed_dated_by_its_slot(self, shipped: ShippedRun) -> None:
        (missed,) = shipped.sources["missed"]
        assert shipped.indices["missed"] == ["saltpeter-2024.02.29"]
        assert missed["@timestamp"] == "2024-02-29T22:30:00.000Z"

    def test_no_environment_values(self, shipped: ShippedRun) -> None:
        assert SECRET_ENV not in repr(shipped.sources)


class TestSearch:
    def test_client_search_finds_documents(self, server: SearchStandin, tmp_path: Path) -> None:
        async def scenario() -> int:
            shipper = make_shipper(server, tmp_path / "spool")
            await shipper.start()
            emit(shipper, [job_start("backup_1"), minion_result("backup_1", "m1")])
            await wait_until(lambda: shipper.sent == 2, "2 documents to be stored")
            await shipper.close()
            if server.product == "elasticsearch":
                import elasticsearch

                client: Any = elasticsearch.AsyncElasticsearch([server.url])
            else:
                import opensearchpy

                client = opensearchpy.AsyncOpenSearch(hosts=[server.url])
            try:
                response = await client.search(index="saltpeter-*", size=100)
            finally:
                await client.close()
            return response["hits"]["total"]["value"]

        assert run(scenario) == 2


# ------------------------------------------------------------------- delivery


class TestOutage:
    def test_spooled_then_delivered_in_order(self, server: SearchStandin, tmp_path: Path) -> None:
        expected = [f"backup_{number:02d}/job_start" for number in range(31)]

        async def scenario() -> Shipper:
            shipper = make_shipper(server, tmp_path / "spool")
            await shipper.start()
            emit(shipper, [job_start("backup_00")])
            await wait_until(lambda: shipper.sent == 1, "the first document to be stored")
            server.refuse_connections()
            for number in range(1, 31):
                emit(shipper, [job_start(f"backup_{number:02d}")])
                await asyncio.sleep(0.01)
            await wait_until(lambda: shipper.spool.documents == 30, "30 spooled documents")
            server.accept_connections()
            await wait_until(lambda: shipper.sent == 31, "31 documents to be stored")
            await shipper.close()
            return shipper

        shipper = run(scenario)
        assert [document.id for document in server.documents()] == expected
        assert shipper.spooled == 30
        assert shipper.dropped == 0

    def test_spool_empty_after_recovery(self, server: SearchStandin, tmp_path: Path) -> None:
        async def scenario() -> Shipper:
            shipper = make_shipper(server, tmp_path / "spool")
            server.refuse_connections()
            await shipper.start()
            emit(shipper, [job_start(f"backup_{number}") for number in range(5)])
            await wait_until(lambda: shipper.spool.documents == 5, "5 spooled documents")
            server.accept_connections()
            await wait_until(lambda: shipper.sent == 5, "5 documents to be stored")
            await shipper.close()
            return shipper

        shipper = run(scenario)
        assert list((tmp_path / "spool").iterdir()) == []
        assert shipper.spool.documents == 0

    def test_bulk_503_retried(self, server: SearchStandin, tmp_path: Path) -> None:
        async def scenario() -> Shipper:
            shipper = make_shipper(server, tmp_path / "spool")
            await shipper.start()
            server.fail_bulk(503, times=2)
            emit(shipper, [job_start(f"backup_{number}") for number in range(3)])
            await wait_until(lambda: shipper.sent == 3, "3 documents to be stored")
            await shipper.close()
            return shipper

        shipper = run(scenario)
        assert len(server.documents()) == 3
        assert bulk_requests(server) == 3
        assert shipper.rejected == 0

    def test_bulk_429_retried(self, server: SearchStandin, tmp_path: Path) -> None:
        async def scenario() -> Shipper:
            shipper = make_shipper(server, tmp_path / "spool")
            await shipper.start()
            server.fail_bulk(429, times=1)
            emit(shipper, [job_start("backup_1")])
            await wait_until(lambda: shipper.sent == 1, "1 document to be stored")
            await shipper.close()
            return shipper

        shipper = run(scenario)
        assert len(server.documents()) == 1
        assert shipper.spooled == 1

    def test_items_rejected_with_429_resent(self, server: SearchStandin, tmp_path: Path) -> None:
        async def scenario() -> Shipper:
            shipper = make_shipper(server, tmp_path / "spool")
            await shipper.start()
            server.fail_items(429, 2)
            emit(shipper, [job_start(f"backup_{number}") for number in range(5)])
            await wait_until(lambda: shipper.sent == 5, "5 documents to be stored")
            await shipper.close()
            return shipper

        shipper = run(scenario)
        stored = sorted(document.id for document in server.documents())
        assert stored == [f"backup_{number}/job_start" for number in range(5)]
        assert shipper.spooled == 2
        assert shipper.rejected == 0

    def test_items_rejected_with_400_dropped(self, server: SearchStandin, tmp_path: Path) -> None:
        async def scenario() -> Shipper:
            shipper = make_shipper(server, tmp_path / "spool")
            await shipper.start()
            server.fail_items(400, 1)
            emit(shipper, [job_start(f"backup_{number}") for number in range(3)])
            await wait_until(lambda: shipper.sent + shipper.rejected == 3, "3 answers")
            await shipper.close()
            return shipper

        shipper = run(scenario)
        assert shipper.sent == 2
        assert shipper.rejected == 1
        assert shipper.spooled == 0

    def test_resend_after_timeout_no_duplicate(self, server: SearchStandin, tmp_path: Path) -> None:
        """The stand-in stores a bulk whose response came too late; the resend replaces it."""

        async def scenario() -> Shipper:
            shipper = make_shipper(server, tmp_path / "spool", request_timeout=0.5)
            await shipper.start()
            server.delay(1.0)
            emit(shipper, [job_start("backup_1"), minion_result("backup_1", "m1")])
            await wait_until(lambda: shipper.spooled == 2, "2 spooled documents")
            await asyncio.sleep(1.0)  # the stand-in stores the late bulk meanwhile
            server.delay(0)
            await wait_until(lambda: shipper.sent == 2, "2 documents to be stored")
            await shipper.close()
            return shipper

        run(scenario)
        versions = {document.id: document.version for document in server.documents()}
        assert len(versions) == 2
        assert max(versions.values()) >= 2

    def test_spool_outlives_restart(self, server: SearchStandin, tmp_path: Path) -> None:
        async def first_engine() -> Shipper:
            shipper = make_shipper(server, tmp_path / "spool")
            server.refuse_connections()
            await shipper.start()
            emit(shipper, [job_start(f"backup_{number}") for number in range(4)])
            await wait_until(lambda: shipper.spool.documents == 4, "4 spooled documents")
            await shipper.close()
            return shipper

        async def second_engine() -> Shipper:
            server.accept_connections()
            shipper = make_shipper(server, tmp_path / "spool")
            await shipper.start()
            await wait_until(lambda: shipper.sent == 4, "4 documents to be stored")
            await shipper.close()
            return shipper

        run(first_engine)
        assert len(server.documents()) == 0
        run(second_engine)
        ids = [document.id for document in server.documents()]
        assert ids == [f"backup_{number}/job_start" for number in range(4)]

    def test_close_spools_queued_events(self, server: SearchStandin, tmp_path: Path) -> None:
        async def scenario() -> Shipper:
            shipper = make_shipper(server, tmp_path / "spool", retry_base=30.0, retry_cap=30.0)
            await shipper.start()
            server.refuse_connections()
            emit(shipper, [job_start("backup_1")])
            await wait_until(lambda: shipper.spool.documents == 1, "1 spooled document")
            emit(shipper, [job_start(f"backup_{number}") for number in range(2, 6)])
            await shipper.close(timeout=1.0)
            return shipper

        shipper = run(scenario)
        reloaded = Spool(tmp_path / "spool", shipping.DEFAULT_SPOOL_MAX_BYTES, 1_000_000)
        assert reloaded.load() == 5
        assert shipper.dropped == 0


class TestSpoolBound:
    def test_oldest_dropped_and_counted(
        self, server: SearchStandin, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        total = 200
        expected = [f"backup_{number:03d}/job_start" for number in range(total)]
        max_bytes = 16 * 1024

        async def scenario() -> Shipper:
            shipper = make_shipper(
                server, tmp_path / "spool", spool_max_bytes=max_bytes, batch_max_bytes=2048
            )
            server.refuse_connections()
            await shipper.start()
            for number in range(total):
                emit(shipper, [job_start(f"backup_{number:03d}")])
                if number % 20 == 19:
                    await asyncio.sleep(0.05)
            await wait_until(lambda: shipper.spooled == total, f"{total} spooled documents")
            assert shipper.spool.size <= max_bytes
            server.accept_connections()
            await wait_until(lambda: shipper.spool.documents == 0, "an empty spool")
            await shipper.close()
            return shipper

        with caplog.at_level(logging.WARNING, logger="saltpeter.shipping"):
            shipper = run(scenario)
        delivered = [document.id for document in server.documents()]
        assert shipper.dropped > 0
        assert shipper.sent + shipper.dropped == total
        assert delivered == expected[shipper.dropped :]
        assert "dropped so far" in caplog.text

    def test_queue_bound_drops_oldest(self, server: SearchStandin, tmp_path: Path) -> None:
        async def scenario() -> Shipper:
            shipper = make_shipper(server, tmp_path / "spool", pending_max=3)
            emit(shipper, [job_start(f"backup_{number}") for number in range(5)])
            await shipper.start()
            await wait_until(lambda: shipper.sent == 3, "3 documents to be stored")
            await shipper.close()
            return shipper

        shipper = run(scenario)
        ids = [document.id for document in server.documents()]
        assert ids == [f"backup_{number}/job_start" for number in (2, 3, 4)]
        assert shipper.dropped == 2


class LoopTicker:
    """A callback every 10 ms on the loop under test, recording the longest gap."""

    def __init__(self) -> None:
        self.longest_gap = 0.0
        self.ticks = 0
        self._last = 0.0
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._last = time.monotonic()
        self._handle = asyncio.get_running_loop().call_later(0.01, self._tick)

    def _tick(self) -> None:
        now = time.monotonic()
        self.longest_gap = max(self.longest_gap, now - self._last)
        self._last = now
        self.ticks += 1
        self._handle = asyncio.get_running_loop().call_later(0.01, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()


class TestEventLoopLiveness:
    def test_loop_runs_while_cluster_hangs(self, server: SearchStandin, tmp_path: Path) -> None:
        """Requests hang for 5 s while events keep coming; the loop must keep ticking."""

        async def scenario() -> tuple[LoopTicker, Shipper]:
            ticker = LoopTicker()
            ticker.start()
            server.delay(5.0)
            shipper = make_shipper(server, tmp_path / "spool", request_timeout=2.0)
            await shipper.start()
            for number in range(120):
                emit(shipper, [job_start(f"backup_{number:03d}")])
                await asyncio.sleep(0.05)
            server.delay(0)
            await wait_until(lambda: shipper.sent == 120, "120 documents to be stored")
            await shipper.close()
            ticker.stop()
            return ticker, shipper

        ticker, shipper = run(scenario)
        assert ticker.longest_gap < 1.0, f"the loop stalled for {ticker.longest_gap:.2f} s"
        assert ticker.ticks > 100
        assert shipper.spooled > 0


# --------------------------------------------------------------- credentials


class TestCredentials:
    USER = "shipper"
    PASSWORD = "pw-3f9c1e-secret"

    def basic_header(self) -> str:
        return base64.b64encode(f"{self.USER}:{self.PASSWORD}".encode()).decode()

    def test_url_credentials_never_logged(
        self,
        servers: Callable[..., SearchStandin],
        product: str,
        tmp_path: Path,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        server = servers(product, credentials=(self.USER, self.PASSWORD))
        url = server.url.replace("http://", f"http://{self.USER}:{self.PASSWORD}@")

        async def scenario() -> Shipper:
            shipper = make_shipper(server, tmp_path / "spool", url=url)
            await shipper.start()
            emit(shipper, [job_start("backup_1")])
            await wait_until(lambda: shipper.sent == 1, "1 document to be stored")
            server.refuse_connections()
            emit(shipper, [job_start("backup_2")])
            await wait_until(lambda: shipper.spool.documents == 1, "1 spooled document")
            server.accept_connections()
            await wait_until(lambda: shipper.sent == 2, "2 documents to be stored")
            await shipper.close()
            return shipper

        with caplog.at_level(logging.DEBUG):
            shipper = run(scenario)
            shipping.shippers_from_settings(
                Settings(**{product: url, f"{product}_index": "Bad Prefix"}),
                tmp_path / "spool-root",
                lambda run_id, minion: "",
                lambda job: None,
            )
        assert len(server.documents()) == 2
        assert "***@127.0.0.1" in caplog.text
        assert self.PASSWORD not in caplog.text
        assert self.basic_header() not in caplog.text
        assert self.PASSWORD not in repr(shipper)

    def test_wrong_password_spools_and_logs_error(
        self,
        servers: Callable[..., SearchStandin],
        product: str,
        tmp_path: Path,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        server = servers(product, credentials=(self.USER, self.PASSWORD))
        url = server.url.replace("http://", f"http://{self.USER}:wrong-{self.PASSWORD}@")

        async def scenario() -> Shipper:
            shipper = make_shipper(server, tmp_path / "spool", url=url)
            await shipper.start()
            emit(shipper, [job_start("backup_1")])
            await wait_until(lambda: shipper.spool.documents == 1, "1 spooled document")
            await shipper.close(timeout=0.5)
            return shipper

        with caplog.at_level(logging.DEBUG):
            shipper = run(scenario)
        errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
        assert any("401" in record.getMessage() for record in errors)
        assert shipper.spool.documents == 1
        assert self.PASSWORD not in caplog.text

    def test_separate_user_and_password(
        self, servers: Callable[..., SearchStandin], product: str, tmp_path: Path
    ) -> None:
        server = servers(product, credentials=(self.USER, self.PASSWORD))
        backend = make_backend(product, server.url, username=self.USER, password=self.PASSWORD)

        async def scenario() -> Shipper:
            shipper = make_shipper(server, tmp_path / "spool", backend=backend)
            await shipper.start()
            emit(shipper, [job_start("backup_1")])
            await wait_until(lambda: shipper.sent == 1, "1 document to be stored")
            await shipper.close()
            return shipper

        run(scenario)
        headers = {record.authorization for record in server.requests(path="/_bulk")}
        assert headers == {f"Basic {self.basic_header()}"}

    def test_elasticsearch_api_key(
        self, servers: Callable[..., SearchStandin], tmp_path: Path
    ) -> None:
        server = servers("elasticsearch")
        server.api_key = "aWQ6a2V5LTA5Zjg="
        backend = make_backend("elasticsearch", server.url, api_key=server.api_key)

        async def scenario() -> Shipper:
            shipper = make_shipper(server, tmp_path / "spool", backend=backend)
            await shipper.start()
            emit(shipper, [job_start("backup_1")])
            await wait_until(lambda: shipper.sent == 1, "1 document to be stored")
            await shipper.close()
            return shipper

        run(scenario)
        assert len(server.documents()) == 1

    def test_spool_has_no_credentials(
        self, servers: Callable[..., SearchStandin], product: str, tmp_path: Path
    ) -> None:
        server = servers(product, credentials=(self.USER, self.PASSWORD))
        url = server.url.replace("http://", f"http://{self.USER}:{self.PASSWORD}@")

        async def scenario() -> None:
            shipper = make_shipper(server, tmp_path / "spool", url=url)
            server.refuse_connections()
            await shipper.start()
            emit(shipper, [job_start("backup_1")])
            await wait_until(lambda: shipper.spool.documents == 1, "1 spooled document")
            await shipper.close(timeout=0.5)

        run(scenario)
        spooled = b"".join(path.read_bytes() for path in (tmp_path / "spool").iterdir())
        assert self.PASSWORD.encode() not in spooled


def write_self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """Write a certificate for 127.0.0.1 and its key; return their paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "saltpeter test stand-in")])
    now = datetime.now(timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    certificate_path = directory / "standin.crt"
    key_path = directory / "standin.key"
    certificate_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return certificate_path, key_path


class TestTls:
    @pytest.fixture
    def tls_server(
        self, servers: Callable[..., SearchStandin], product: str, tmp_path: Path
    ) -> tuple[SearchStandin, Path]:
        certificate_path, key_path = write_self_signed_certificate(tmp_path)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(certificate_path, key_path)
        return servers(product, tls=context), certificate_path

    def test_ca_certs_trusts_private_ca(
        self, tls_server: tuple[SearchStandin, Path], tmp_path: Path
    ) -> None:
        server, certificate_path = tls_server
        backend = make_backend(server.product, server.url, ca_certs=str(certificate_path))

        async def scenario() -> Shipper:
            shipper = make_shipper(server, tmp_path / "spool", backend=backend)
            await shipper.start()
            emit(shipper, [job_start("backup_1")])
            await wait_until(lambda: shipper.sent == 1, "1 document to be stored")
            await shipper.close()
            return shipper

        run(scenario)
        assert len(server.documents()) == 1

    def test_unknown_ca_spools(
        self, tls_server: tuple[SearchStandin, Path], tmp_path: Path
    ) -> None:
        server, _ = tls_server

        async def scenario() -> Shipper:
            shipper = make_shipper(server, tmp_path / "spool")
            await shipper.start()
            emit(shipper, [job_start("backup_1")])
            await wait_until(lambda: shipper.spool.documents == 1, "1 spooled document")
            await shipper.close(timeout=0.5)
            return shipper

        shipper = run(scenario)
        assert server.documents() == []
        assert shipper.sent == 0


# ------------------------------------------------------------------ template


class TestTemplate:
    def test_installed_once(self, server: SearchStandin, tmp_path: Path) -> None:
        async def start_and_ship(run_id: str) -> None:
            shipper = make_shipper(server, tmp_path / "spool")
            await shipper.start()
            emit(shipper, [job_start(run_id)])
            await wait_until(lambda: shipper.sent == 1, "1 document to be stored")
            await shipper.close()

        run(lambda: start_and_ship("backup_1"))
        run(lambda: start_and_ship("backup_2"))
        puts = server.requests(method="PUT", path="/_index_template/saltpeter")
        heads = server.requests(method="HEAD", path="/_index_template/saltpeter")
        assert len(puts) == 1
        assert len(heads) == 2

    def test_installed_body(self, server: SearchStandin, tmp_path: Path) -> None:
        async def scenario() -> None:
            shipper = make_shipper(server, tmp_path / "spool")
            await shipper.start()
            await shipper.close()

        run(scenario)
        assert server.templates()["saltpeter"] == shipping.index_template("saltpeter")

    def test_installed_before_first_bulk_after_outage(
        self, server: SearchStandin, tmp_path: Path
    ) -> None:
        async def scenario() -> None:
            shipper = make_shipper(server, tmp_path / "spool")
            server.refuse_connections()
            await shipper.start()
            emit(shipper, [job_start("backup_1")])
            await wait_until(lambda: shipper.spool.documents == 1, "1 spooled document")
            server.accept_connections()
            await wait_until(lambda: shipper.sent == 1, "1 document to be stored")
            await shipper.close()

        run(scenario)
        paths = [record.path for record in server.requests() if record.method != "HEAD"]
        assert paths == ["/_index_template/saltpeter", "/_bulk"]

    def test_existing_template_left_alone(self, server: SearchStandin, tmp_path: Path) -> None:
        server._put_template("saltpeter", {"index_patterns": ["saltpeter-*"], "custom": True})

        async def scenario() -> None:
            shipper = make_shipper(server, tmp_path / "spool")
            await shipper.start()
            await shipper.close()

        run(scenario)
        assert server.templates()["saltpeter"]["custom"] is True


# ------------------------------------------------------------------ settings


class TestShippersFromSettings:
    def test_both_clusters_get_documents(
        self, servers: Callable[..., SearchStandin], tmp_path: Path
    ) -> None:
        elastic = servers("elasticsearch")
        opensearch = servers("opensearch")
        settings = Settings(elasticsearch=elastic.url, opensearch=opensearch.url)

        async def scenario() -> list[Shipper]:
            shippers = shipping.shippers_from_settings(
                settings, tmp_path / "spool", lambda run_id, minion: "", lambda job: "jobs"
            )
            for shipper in shippers:
                await shipper.start()
                emit(shipper, [job_start("backup_1")])
            await wait_until(lambda: all(s.sent == 1 for s in shippers), "both deliveries")
            for shipper in shippers:
                await shipper.close()
            return shippers

        shippers = run(scenario)
        assert [shipper.backend.product for shipper in shippers] == ["Elasticsearch", "OpenSearch"]
        assert len(elastic.documents()) == 1
        assert len(opensearch.documents()) == 1

    def test_spool_directory_per_cluster(self, tmp_path: Path) -> None:
        settings = Settings(elasticsearch="http://127.0.0.1:9", opensearch="http://127.0.0.1:9")
        shippers = shipping.shippers_from_settings(
            settings, tmp_path / "spool", lambda run_id, minion: "", lambda job: None
        )
        directories = [shipper.spool.directory for shipper in shippers]
        assert directories == [tmp_path / "spool/elasticsearch", tmp_path / "spool/opensearch"]

    def test_index_setting_used(self, tmp_path: Path) -> None:
        settings = Settings(elasticsearch="http://127.0.0.1:9", elasticsearch_index="cron")
        (shipper,) = shipping.shippers_from_settings(
            settings, tmp_path / "spool", lambda run_id, minion: "", lambda job: None
        )
        assert shipper.index_prefix == "cron"

    def test_nothing_configured_no_shippers(self, tmp_path: Path) -> None:
        shippers = shipping.shippers_from_settings(
            Settings(), tmp_path / "spool", lambda run_id, minion: "", lambda job: None
        )
        assert shippers == []

    def test_missing_library_names_extra(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        # A None entry in sys.modules makes "import elasticsearch" raise ImportError.
        monkeypatch.setitem(sys.modules, "elasticsearch", None)
        settings = Settings(elasticsearch="http://127.0.0.1:9", opensearch="http://127.0.0.1:9")
        with caplog.at_level(logging.ERROR, logger="saltpeter.shipping"):
            shippers = shipping.shippers_from_settings(
                settings, tmp_path / "spool", lambda run_id, minion: "", lambda job: None
            )
        assert [shipper.backend.product for shipper in shippers] == ["OpenSearch"]
        assert len(caplog.records) == 1
        assert "saltpeter[elasticsearch]" in caplog.text

    def test_invalid_url_logged_masked(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        settings = Settings(elasticsearch="elastic:hunter2@es.example:9200")
        with caplog.at_level(logging.ERROR, logger="saltpeter.shipping"):
            shippers = shipping.shippers_from_settings(
                settings, tmp_path / "spool", lambda run_id, minion: "", lambda job: None
            )
        assert shippers == []
        assert "'elasticsearch'" in caplog.text
        assert "hunter2" not in caplog.text

    def test_invalid_index_prefix_logged(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        settings = Settings(opensearch="http://127.0.0.1:9", opensearch_index="Cron")
        with caplog.at_level(logging.ERROR, logger="saltpeter.shipping"):
            shippers = shipping.shippers_from_settings(
                settings, tmp_path / "spool", lambda run_id, minion: "", lambda job: None
            )
        assert shippers == []
        assert "'opensearch_index': 'Cron' is invalid" in caplog.text


# --------------------------------------------------------------------- hooks


class TestHooks:
    def test_on_event_sends_nothing_itself(self, server: SearchStandin, tmp_path: Path) -> None:
        async def scenario() -> None:
            shipper = make_shipper(server, tmp_path / "spool")
            emit(shipper, [job_start("backup_1"), minion_result("backup_1", "m1")])
            await asyncio.sleep(0.2)

        run(scenario)
        assert server.requests() == []

    def test_other_events_ignored(self, server: SearchStandin, tmp_path: Path) -> None:
        async def scenario() -> Shipper:
            shipper = make_shipper(server, tmp_path / "spool")
            await shipper.start()
            shipper.on_event("saltpeter/reply/abc", {"job": "backup"})
            shipper.on_output("backup", "backup_1", "m1", "some output\n")
            emit(shipper, [job_start("backup_1")])
            await wait_until(lambda: shipper.sent == 1, "1 document to be stored")
            await shipper.close()
            return shipper

        run(scenario)
        assert len(server.documents()) == 1

    def test_unreadable_output_still_ships_result(
        self, server: SearchStandin, tmp_path: Path
    ) -> None:
        def broken_output(run_id: str, minion: str) -> str:
            raise OSError("database is locked")

        async def scenario() -> None:
            shipper = make_shipper(server, tmp_path / "spool", output_of=broken_output)
            await shipper.start()
            emit(shipper, [minion_result("backup_1", "m1", retcode=2)])
            await wait_until(lambda: shipper.sent == 1, "1 document to be stored")
            await shipper.close()

        run(scenario)
        (document,) = server.documents()
        assert document.source["return_code"] == 2
        assert document.source["output"] == ""
