"""Result backends: where task states and results live. See `protocol.ResultBackend`."""

from appliance.backend.protocol import ErrorInfo, ResultBackend, TaskResult

__all__ = ["ErrorInfo", "ResultBackend", "TaskResult"]
