"""txfaas.config: one duration parser, one URL parser, one "flag, else env var" rule."""

from __future__ import annotations

import ipaddress
import math
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from txfaas.config import (
    AMQPURL,
    ConfigError,
    Flag,
    Flags,
    RedisURL,
    format_duration,
    format_size,
    option_or_env,
    parse_amqp_url,
    parse_bool,
    parse_count,
    parse_duration,
    parse_networks,
    parse_positive_duration,
    parse_positive_int,
    parse_redis_url,
    parse_size,
    parse_url_template,
    read_secret,
)

# --- parse_duration -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("10", 10.0),
        ("10s", 10.0),
        ("1m30s", 90.0),
        ("500ms", 0.5),
        ("1.5h", 5400.0),
        ("2.5", 2.5),
        ("0", 0.0),
        ("0s", 0.0),
        (" 10s ", 10.0),
        ("1h2m3s4ms", 3723.004),
        ("250us", 0.00025),
        ("+5s", 5.0),
        (10, 10.0),
        (2.5, 2.5),
    ],
)
def test_parse_duration_accepts_bare_seconds_and_go_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    [
        "-1",
        "-10s",
        "-1m30s",
        "",
        "   ",
        "abc",
        "10x",
        "s",
        "ms",
        "1s2",
        "1 s",
        "nan",
        "NaN",
        "inf",
        "-inf",
        "infinity",
        "1e400",
        "-",
        "+",
        "--1s",
        "1m-30s",
        float("nan"),
        float("inf"),
        -1,
        -0.5,
        True,
    ],
)
def test_parse_duration_refuses_negative_empty_malformed_and_non_finite_values(text):
    with pytest.raises(ValueError):
        parse_duration(text)


_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


@given(
    st.lists(
        st.tuples(st.integers(0, 10_000), st.sampled_from(sorted(_UNIT_SECONDS))), min_size=1, max_size=5
    )
)
def test_parse_duration_of_a_go_duration_is_the_sum_of_its_parts(parts):
    text = "".join(f"{n}{unit}" for n, unit in parts)
    expected = sum(n * _UNIT_SECONDS[unit] for n, unit in parts)
    assert parse_duration(text) == pytest.approx(expected, rel=1e-12, abs=1e-12)


@given(st.floats(min_value=0, max_value=1e12, allow_nan=False, allow_infinity=False))
def test_format_duration_output_parses_back_to_nearly_the_same_duration(seconds):
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds, rel=1e-9, abs=1e-6)


@pytest.mark.parametrize(("seconds", "text"), [(10, "10s"), (0.5, "500ms"), (1.5, "1.5s"), (90.0, "90s")])
def test_format_duration_is_short_for_common_values(seconds, text):
    assert format_duration(seconds) == text


# --- parse_size ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1048576", 1048576),
        ("512KiB", 512 * 1024),
        ("10MiB", 10 * 1024**2),
        ("2GiB", 2 * 1024**3),
        ("1MB", 1_000_000),
        ("1kb", 1000),
        ("1K", 1000),
        ("3Mi", 3 * 1024**2),
        ("7b", 7),
        (" 10 MiB ", 10 * 1024**2),
        (4096, 4096),
        ("0", 0),
    ],
)
def test_parse_size_accepts_bytes_and_decimal_and_binary_units(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "abc", "-1", "1.5MiB", "10TiB", "10 x", "MiB", -1, True])
def test_parse_size_refuses_malformed_negative_and_unknown_units(text):
    with pytest.raises(ValueError):
        parse_size(text)


@given(
    st.integers(0, 10**6), st.sampled_from([("KiB", 1024), ("MiB", 1024**2), ("KB", 1000), ("GB", 1000**3)])
)
def test_parse_size_multiplies_by_the_unit(n, unit):
    suffix, factor = unit
    assert parse_size(f"{n}{suffix}") == n * factor


# --- parse_redis_url ----------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["memory:", "memory", "memory://", " memory: "])
def test_parse_redis_url_memory_selects_the_in_process_store(text):
    assert parse_redis_url(text) == RedisURL(memory=True)


def test_parse_redis_url_reads_password_host_port_and_db():
    assert parse_redis_url("redis://:pw@h:1/2") == RedisURL(host="h", port=1, db=2, password="pw")


def test_parse_redis_url_defaults_to_localhost_6379_db_0_without_password():
    assert parse_redis_url("redis://") == RedisURL()
    assert parse_redis_url("redis://redis.example") == RedisURL(host="redis.example")


def test_parse_redis_url_percent_decodes_the_password():
    assert parse_redis_url("redis://:p%40ss%3Aw@h/0").password == "p@ss:w"


def test_parse_redis_url_reads_a_unix_socket_path():
    assert parse_redis_url("unix:///run/redis.sock") == RedisURL(unix_socket="/run/redis.sock")


@pytest.mark.parametrize(
    "text",
    [
        "http://h:6379/0",
        "rediss://h/0",
        "h:6379",
        "unix://",
        "redis://h/abc",
        "redis://h/-1",
        "redis://h/1/2",
        "redis://h:99999/0",
        "redis://h:port/0",
    ],
)
def test_parse_redis_url_refuses_bad_scheme_port_and_db(text):
    with pytest.raises(ValueError):
        parse_redis_url(text)


# --- parse_amqp_url -----------------------------------------------------------------------------


def test_parse_amqp_url_percent_2f_vhost_is_slash():
    url = parse_amqp_url("amqp://guest:guest@127.0.0.1:5672/%2F")
    assert url == AMQPURL(host="127.0.0.1", port=5672, vhost="/", username="guest", password="guest")


@pytest.mark.parametrize("text", ["amqp://rabbit", "amqp://rabbit/"])
def test_parse_amqp_url_default_vhost_is_slash(text):
    assert parse_amqp_url(text).vhost == "/"


def test_parse_amqp_url_reads_a_named_vhost():
    assert parse_amqp_url("amqp://h/prod").vhost == "prod"


def test_parse_amqp_url_amqps_defaults_to_port_5671_with_tls():
    url = parse_amqp_url("amqps://h")
    assert (url.port, url.tls) == (5671, True)
    assert (parse_amqp_url("amqp://h").port, parse_amqp_url("amqp://h").tls) == (5672, False)


def test_parse_amqp_url_percent_decodes_credentials():
    url = parse_amqp_url("amqp://us%40er:p%3Ass%2Fw%25@h")
    assert (url.username, url.password) == ("us@er", "p:ss/w%")


def test_parse_amqp_url_defaults_credentials_to_guest():
    url = parse_amqp_url("amqp://h")
    assert (url.username, url.password) == ("guest", "guest")


def test_parse_amqp_url_reads_heartbeat_from_the_query():
    assert parse_amqp_url("amqp://h/?heartbeat=5").heartbeat == 5
    assert parse_amqp_url("amqp://h/?heartbeat=x").heartbeat == 30


@pytest.mark.parametrize("text", ["memory:", "memory"])
def test_parse_amqp_url_memory_selects_the_in_process_queue(text):
    assert parse_amqp_url(text) == AMQPURL(memory=True)


@pytest.mark.parametrize("text", ["http://h", "h:5672", "amqp://h:99999", "amqp://h:port"])
def test_parse_amqp_url_refuses_bad_scheme_and_port(text):
    with pytest.raises(ValueError):
        parse_amqp_url(text)


_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
_hosts = st.one_of(
    st.lists(_label, min_size=1, max_size=3).map(".".join),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
)
_credential = st.text(min_size=1, max_size=20).filter(lambda s: "\x00" not in s)


@given(
    host=_hosts,
    port=st.integers(1, 65535),
    vhost=st.text(min_size=1, max_size=20),
    username=_credential,
    password=_credential,
    tls=st.booleans(),
    heartbeat=st.integers(0, 600),
)
def test_amqp_url_property_round_trips_through_parse_amqp_url(
    host, port, vhost, username, password, tls, heartbeat
):
    url = AMQPURL(
        host=host, port=port, vhost=vhost, username=username, password=password, tls=tls, heartbeat=heartbeat
    )
    assert parse_amqp_url(url.url) == url


def test_amqp_url_brackets_an_ipv6_host():
    assert "@[::1]:5672/" in AMQPURL(host="::1").url


# --- parse_networks -----------------------------------------------------------------------------


def test_parse_networks_splits_cidrs_addresses_and_host_names():
    nets, hosts = parse_networks(" 10.0.0.0/8, 192.168.1.7 ,::1, fd00::/8, Hooks.Example.COM., localhost,, ")
    assert nets == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("192.168.1.7/32"),
        ipaddress.ip_network("::1/128"),
        ipaddress.ip_network("fd00::/8"),
    )
    assert hosts == ("hooks.example.com", "localhost")


def test_parse_networks_masks_host_bits_of_a_cidr():
    assert parse_networks("10.1.2.3/8")[0] == (ipaddress.ip_network("10.0.0.0/8"),)


def test_parse_networks_of_nothing_is_empty():
    assert parse_networks("") == ((), ())


@pytest.mark.parametrize("text", ["http://x", "a b", "host_name", "10.0.0.0/8,*.example.com"])
def test_parse_networks_refuses_what_is_neither_network_nor_host_name(text):
    with pytest.raises(ValueError):
        parse_networks(text)


# --- option_or_env ------------------------------------------------------------------------------


def test_option_or_env_flag_wins_over_environment():
    value = option_or_env({"timeout": "5s"}, "timeout", ("TIMEOUT",), 1.0, parse_duration, {"TIMEOUT": "9s"})
    assert value == 5.0


def test_option_or_env_environment_wins_over_default():
    value = option_or_env({"timeout": None}, "timeout", ("TIMEOUT",), 1.0, parse_duration, {"TIMEOUT": "9s"})
    assert value == 9.0


def test_option_or_env_first_set_environment_variable_wins_and_empty_ones_are_unset():
    environ = {"A_TIMEOUT": "", "B_TIMEOUT": "2s", "C_TIMEOUT": "3s"}
    value = option_or_env(
        {}, "timeout", ("A_TIMEOUT", "B_TIMEOUT", "C_TIMEOUT"), 1.0, parse_duration, environ
    )
    assert value == 2.0


def test_option_or_env_default_when_neither_flag_nor_environment():
    sentinel = object()
    assert option_or_env({}, "timeout", ("TIMEOUT",), sentinel, parse_duration, {}) is sentinel


def test_option_or_env_reads_os_environ_when_no_environ_is_given(monkeypatch):
    monkeypatch.setenv("TXFAAS_TEST_TIMEOUT", "7s")
    assert option_or_env({}, "timeout", ("TXFAAS_TEST_TIMEOUT",), 1.0, parse_duration) == 7.0


def test_option_or_env_error_from_a_flag_names_the_flag():
    with pytest.raises(ConfigError) as info:
        option_or_env({"read-timeout": "soon"}, "read-timeout", ("READ_TIMEOUT",), 1.0, parse_duration, {})
    assert info.value.setting == "--read-timeout"
    assert str(info.value).startswith("--read-timeout: ")
    assert "\n" not in str(info.value)


def test_option_or_env_error_from_the_environment_names_flag_and_variable():
    with pytest.raises(ConfigError) as info:
        option_or_env({}, "read-timeout", ("READ_TIMEOUT",), 1.0, parse_duration, {"READ_TIMEOUT": "soon"})
    assert info.value.setting == "--read-timeout (from $READ_TIMEOUT)"
    assert "soon" in info.value.problem


def test_config_error_is_a_value_error():
    assert isinstance(ConfigError("--x", "bad"), ValueError)


# --- read_secret --------------------------------------------------------------------------------


def test_read_secret_reads_the_named_file_stripped(tmp_path):
    (tmp_path / "basic-auth-password").write_text("  s3cret\n", encoding="utf-8")
    assert read_secret(str(tmp_path), "basic-auth-password") == "s3cret"


def test_read_secret_missing_file_is_a_config_error_naming_the_mount_and_path(tmp_path):
    with pytest.raises(ConfigError) as info:
        read_secret(str(tmp_path), "nope")
    assert info.value.setting == "--secret-mount-path"
    assert str(tmp_path / "nope") in info.value.problem


def test_format_duration_never_uses_an_exponent():
    for seconds in (1234567.5, 1e7 + 0.25, 0.000123):
        text = format_duration(seconds)
        assert "e" not in text.replace("s", "").replace("m", ""), text
        assert math.isfinite(parse_duration(text))


# --- small parsers shared by every tap -----------------------------------------------------------


def test_parse_positive_duration_refuses_zero_and_takes_every_duration_form():
    assert parse_positive_duration("1m30s") == 90.0
    assert parse_positive_duration(2) == 2.0
    for bad in ["0", "0s", "-1s", "soon"]:
        with pytest.raises(ValueError):
            parse_positive_duration(bad)


@pytest.mark.parametrize(("value", "n"), [("1", 1), (" 8 ", 8), (256, 256)])
def test_parse_positive_int_accepts_whole_numbers_from_one(value, n):
    assert parse_positive_int(value) == n


@pytest.mark.parametrize("value", ["0", "-3", "1.5", "many", "", True])
def test_parse_positive_int_refuses_zero_negatives_fractions_words_and_booleans(value):
    with pytest.raises(ValueError):
        parse_positive_int(value)


def test_parse_count_accepts_zero_and_refuses_negatives_and_words():
    assert (parse_count("0"), parse_count(" 5"), parse_count(7)) == (0, 5, 7)
    for bad in ["-1", "many", "2.0", False]:
        with pytest.raises(ValueError):
            parse_count(bad)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("true", True),
        ("YES", True),
        ("on", True),
        ("1", True),
        (True, True),
        ("false", False),
        ("0", False),
        ("off", False),
        ("no", False),
        ("", False),
        (False, False),
    ],
)
def test_parse_bool_reads_the_usual_spellings(value, expected):
    assert parse_bool(value) is expected


def test_parse_bool_refuses_anything_else():
    with pytest.raises(ValueError, match="not true or false"):
        parse_bool("maybe")


@pytest.mark.parametrize(
    "template",
    ["http://{name}:8080", "https://{name}.{namespace}.svc:8080/", "http://gw:8080/function/{name}"],
)
def test_parse_url_template_returns_a_good_template_unchanged(template):
    assert parse_url_template(template) == template


@pytest.mark.parametrize(
    ("template", "reason"),
    [
        ("http://{nme}:8080", "only {name} and {namespace}"),
        ("http://{0}:8080", "only {name} and {namespace}"),
        ("http://{name:8080", "only {name} and {namespace}"),
        ("ftp://{name}:21", "not an http(s) URL template"),
        ("{name}:8080", "not an http(s) URL template"),
    ],
)
def test_parse_url_template_refuses_unknown_fields_and_non_http_urls(template, reason):
    with pytest.raises(ValueError, match=re.escape(reason)):
        parse_url_template(template)


@pytest.mark.parametrize(("n", "text"), [(16 * 1024**2, "16MiB"), (512 * 1024, "512KiB"), (1000, "1000")])
def test_format_size_is_short_and_parses_back(n, text):
    assert format_size(n) == text
    assert parse_size(text) == n


@given(st.integers(min_value=0, max_value=2**40))
def test_format_size_output_parses_back_to_the_same_size(n):
    assert parse_size(format_size(n)) == n


# --- the flag table ------------------------------------------------------------------------------

FLAGS = Flags(
    Flag("timeout", ("TIMEOUT", "timeout"), "10s", "Longest wait"),
    Flag("limit", ("LIMIT",), None, "Largest body", shown="no limit"),
    Flag("name", (), None, "A name"),
)


def test_flags_usage_names_the_variables_and_the_default():
    assert [row[:3] for row in FLAGS.opt_parameters()] == [
        ["timeout", None, None],
        ["limit", None, None],
        ["name", None, None],
    ]
    assert [row[3] for row in FLAGS.opt_parameters()] == [
        "Longest wait [$TIMEOUT, $timeout; default 10s]",
        "Largest body [$LIMIT; default no limit]",
        "A name",
    ]


def test_flags_opt_parameters_can_leave_flags_out():
    assert [row[0] for row in FLAGS.opt_parameters(leave_out=("limit",))] == ["timeout", "name"]


def test_flags_reader_flag_then_variables_then_parsed_default():
    get = FLAGS.reader({"timeout": None}, {"timeout": "5s"})
    assert get("timeout", parse_duration) == 5.0
    get = FLAGS.reader({"timeout": "1m"}, {"TIMEOUT": "5s"})
    assert get("timeout", parse_duration) == 60.0
    get = FLAGS.reader({}, {})
    assert get("timeout", parse_duration) == 10.0
    assert get("limit", parse_size) is None


def test_flags_reader_errors_name_the_flag_and_the_variable():
    get = FLAGS.reader({}, {"timeout": "soon"})
    with pytest.raises(ConfigError, match=r"^--timeout \(from \$timeout\): not a duration"):
        get("timeout", parse_duration)


def test_a_default_its_parser_refuses_is_an_error_naming_the_flag_and_default():
    get = FLAGS.reader({}, {})
    with pytest.raises(ConfigError, match=r"^--timeout \(default 10s\)"):
        get("timeout", parse_positive_int)
