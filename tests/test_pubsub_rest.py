"""The pull response decoder: the API's JSON to message ids, ack ids and decoded data, in one pass."""

from __future__ import annotations

import base64

import msgspec
import pytest

from clickflow_pubsub.rest import _decode_pull


def test_a_pull_response_gives_ack_ids_message_ids_and_decoded_data_ignoring_other_fields() -> None:
    data = base64.b64encode(b'{"session_id": "SID-1"}').decode()
    answer = (
        '{"receivedMessages": [{"ackId": "a1", "deliveryAttempt": 2, "message": {"data": "' + data + '",'
        ' "messageId": "m1", "publishTime": "2024-07-01T09:00:00.123Z", "attributes": {"k": "v"}}},'
        ' {"ackId": "a2", "message": {"messageId": "m2", "publishTime": "2024-07-01T09:00:00Z"}}]}'
    )
    first, second = _decode_pull(answer.encode()).received_messages
    assert (first.ack_id, first.message.message_id, first.message.data) == ("a1", "m1", b'{"session_id": "SID-1"}')
    assert (second.ack_id, second.message.message_id, second.message.data) == ("a2", "m2", b"")


def test_an_empty_pull_has_no_messages() -> None:
    assert _decode_pull(b"{}").received_messages == []


NOT_BASE64 = b'{"receivedMessages": [{"ackId": "a", "message": {"messageId": "m", "data": "%%"}}]}'


@pytest.mark.parametrize("answer", [b"<html>proxy error</html>", b'{"receivedMessages": [{"ackId": 1}]}', NOT_BASE64])
def test_an_answer_that_is_not_a_pull_response_is_a_value_error(answer: bytes) -> None:
    with pytest.raises(ValueError):
        _decode_pull(answer)
    assert issubclass(msgspec.DecodeError, ValueError)
