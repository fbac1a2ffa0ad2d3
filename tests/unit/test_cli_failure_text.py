"""A failed run is reported by its root cause: the client's error, not Dagster's wrappers."""

from dagster._utils.error import SerializableErrorInfo

from pipelines.summary import root_cause


def _error(cls_name: str, message: str, cause: SerializableErrorInfo | None = None) -> SerializableErrorInfo:
    return SerializableErrorInfo(
        message=message, stack=["  File 'x.py', line 1\n"], cls_name=cls_name, cause=cause
    )


def test_root_cause_is_the_innermost_error_without_stack() -> None:
    inner = _error(
        "RedoxAuthError",
        "RedoxAuthError: POST /v2/auth/token -> HTTP 401: Redox said: invalid_client.\n What to do: check REDOX_CLIENT_ID\n",
    )
    wrapped = _error(
        "DagsterExecutionStepExecutionError",
        'Error occurred while executing op "fhir_encounters":\n',
        cause=inner,
    )
    said = root_cause(wrapped)
    assert said.startswith("RedoxAuthError: POST /v2/auth/token -> HTTP 401: Redox said: invalid_client")
    assert "\n" not in said and "File" not in said and "executing op" not in said


def test_root_cause_names_the_class_once() -> None:
    assert root_cause(_error("ValueError", "bad day")) == "ValueError: bad day"
