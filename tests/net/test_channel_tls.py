"""MessageChannel over a real TLSStream on 127.0.0.1 (port 0): hello, then 2.76 MB tensors."""

from __future__ import annotations

from functools import partial

import numpy as np
import trio
from OpenSSL import SSL

from drm_lab.certs import Identity
from drm_wire.messages import InferenceRequest, PeerRole
from drm_wire.net.channel import open_channel
from drm_wire.net.request_channel import open_request_channel
from drm_wire.net.tls import accept_tls, client_context, open_tls_client, server_context
from drm_wire.protocol import Link, Side
from drm_wire.tensors import Tensor
from tests.net.channel_fakes import CLIENT_SOFTWARE, SERVER_SOFTWARE, result_for

LOOPBACK = "127.0.0.1"
#: One 480x480 RGB float32 image: the size the wire benchmark uses.
IMAGE_SHAPE = (1, 3, 480, 480)


async def test_tensor_requests_over_tls_loopback(ca: Identity, server_id: Identity) -> None:
    server_ctx: SSL.Context = server_context(certificate=server_id.cert, private_key=server_id.key)
    client_ctx: SSL.Context = client_context(ca_certificates=[ca.cert])
    served: list[int] = []
    server_done = trio.Event()

    async def enclave(tcp: trio.SocketStream) -> None:
        stream = await accept_tls(tcp, server_ctx)
        async with open_channel(stream, Link.CONSUMER, Side.SERVER) as channel:
            await channel.accept_hello(software=SERVER_SOFTWARE)
            try:
                async for request in channel:
                    assert isinstance(request, InferenceRequest)
                    served.append(request.inputs[0].data.nbytes)
                    await channel.send(result_for(request))
            finally:
                server_done.set()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, enclave, 0, host=LOOPBACK))
        port = listeners[0].socket.getsockname()[1]
        stream = await open_tls_client(LOOPBACK, port, client_ctx)
        async with open_request_channel(stream, Link.CONSUMER, Side.CLIENT) as client:
            welcome = await client.hello(role=PeerRole.CONSUMER, software=CLIENT_SOFTWARE)
            assert welcome.software == SERVER_SOFTWARE

            rng = np.random.default_rng(7)
            images = [rng.random(IMAGE_SHAPE, dtype=np.float32) for _ in range(4)]
            outputs: dict[int, np.ndarray] = {}

            async def ask(index: int) -> None:
                request = InferenceRequest(
                    request_id=client.next_request_id(),
                    model="m",
                    inputs=(Tensor.from_numpy("x", images[index]),),
                )
                result = await client.request(request)
                outputs[index] = result.outputs[0].to_numpy()

            await ask(0)  # one alone, then three at once on the same connection
            async with trio.open_nursery() as requests:
                for index in (1, 2, 3):
                    requests.start_soon(ask, index)
        # Leaving the block closed the channel with close_notify: the server saw a clean end.
        await server_done.wait()
        nursery.cancel_scope.cancel()

    assert served == [images[0].nbytes] * 4 == [2_764_800] * 4
    for index, image in enumerate(images):
        assert np.array_equal(outputs[index], image * 2)
