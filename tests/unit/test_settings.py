"""Kafka security settings: read from the environment, validated, and handed to every client kind."""

import ssl

import pytest

from stream.settings import KafkaSecurity, SettingsError

SASL_ENV = {
    "KAFKA_SECURITY_PROTOCOL": "sasl_ssl",
    "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
    "KAFKA_SASL_USERNAME": "playrec",
    "KAFKA_SASL_PASSWORD": "pa55word-not-for-logs",
}


def test_plaintext_is_the_default_and_adds_nothing(monkeypatch):
    for name in SASL_ENV:
        monkeypatch.delenv(name, raising=False)
    security = KafkaSecurity.from_env()
    security.validate()
    assert security.protocol == "PLAINTEXT"
    assert security.faust_credentials() is None
    assert security.aiokafka_kwargs() == {} and security.kafka_python_kwargs() == {}


def test_sasl_ssl_reaches_every_client_kind(monkeypatch):
    for name, value in SASL_ENV.items():
        monkeypatch.setenv(name, value)
    security = KafkaSecurity.from_env()
    security.validate()
    assert "pa55word" not in repr(security)
    aio = security.aiokafka_kwargs()
    assert aio["security_protocol"] == "SASL_SSL" and aio["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (aio["sasl_plain_username"], aio["sasl_plain_password"]) == ("playrec", "pa55word-not-for-logs")
    assert isinstance(aio["ssl_context"], ssl.SSLContext)
    kp = security.kafka_python_kwargs()
    assert kp["security_protocol"] == "SASL_SSL" and kp["sasl_plain_password"] == "pa55word-not-for-logs"
    assert isinstance(kp["ssl_context"], ssl.SSLContext)
    credentials = security.faust_credentials()
    assert type(credentials).__name__ == "SASLCredentials"
    assert credentials.username == "playrec" and credentials.ssl_context is not None


def test_incomplete_or_unknown_security_settings_are_refused():
    with pytest.raises(SettingsError, match="needs KAFKA_SASL_MECHANISM"):
        KafkaSecurity(protocol="SASL_SSL", sasl_mechanism="PLAIN").validate()
    with pytest.raises(SettingsError, match="is not one of"):
        KafkaSecurity(protocol="TLS").validate()
