"""The control channel: operate running workers through the store (see `protocol`)."""

from appliance.control.protocol import (
    BROADCAST,
    COMMANDS,
    ControlChannel,
    ControlReply,
    ControlRequest,
)

__all__ = ["BROADCAST", "COMMANDS", "ControlChannel", "ControlReply", "ControlRequest"]
