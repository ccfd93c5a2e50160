"""The plugin's own BrokerClient in a process of the bench's: sessions at the plugin's cadence,
and a sender measuring its CPU per `send`. Standard library only, like the plugin.

    python bench/plugin_client.py listeners PLUGIN URL TOKEN BASE START COUNT
    python bench/plugin_client.py send-loop PLUGIN URL TOKEN NAME TO N
    python bench/plugin_client.py floor-receive PLUGIN URL TOKEN NAME
    python bench/plugin_client.py floor-send PLUGIN URL TOKEN NAME

PLUGIN is plugin.pyz (dispatch_plugin.py sits at its root, and imports from the zip) or a
directory holding dispatch_plugin.py. Both write one JSON object a line on stdout.

listeners: COUNT sessions named BASE-NNNN, one thread each, each as the channel keeps its link:
identify, then one listen after another (LISTEN_SECONDS, keepalives on it, no ping), a new
link after a failure with the plugin's capped backoff; mail is reported ({"m", "n", "t"}) and
acked in batches. What they skip is the stdio side and the transcript: 1,000 of them fit in a
few processes, where 1,000 plugin processes would not fit this machine.

send-loop: identify as NAME, then N sends to TO, one after another; reports the CPU time of this
process over the loop ({"n", "cpu_s", "wall_s"}).

floor-receive and floor-send drive bench/sdk_floor_server.py (the SDK alone) as the throughput
section's plugins drive the broker, without stdio or a transcript: a receiver listens, reports
each message ({"m", "t"}) and acks what one PROOF_POLL look gathered in one call, as the plugin
does; a sender reads one run a line on stdin, "TO N DEPTH PREFIX", makes N sends to TO with DEPTH
in flight, and reports {"sent", "errors"}.
"""

import contextlib
import json
import os
import sys
import threading
import time


def load_plugin(where: str):
    sys.path.insert(0, where if where.endswith(".pyz") else os.path.dirname(os.path.abspath(where)) if
                    where.endswith(".py") else where)
    import dispatch_plugin

    return dispatch_plugin


def out(message: dict, lock=threading.Lock()) -> None:
    with lock:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()


def client(plugin, url: str, token: str, name: str):
    base = plugin.TOKEN_RE.fullmatch(token)[1]
    config = plugin.Config(url=url, token=token, base=base, name=name, token_source="bench")
    return plugin.BrokerClient(config)


class Acks:
    """The plugin's batching of acks: what arrived while the previous ack was made (and, with
    `look`, in the `look` seconds after the first of them) shares one call, on a thread of its own."""

    def __init__(self, plugin, ack, name: str, look: float = 0.0):
        self.plugin, self.ack, self.name, self.look = plugin, ack, name, look
        self.ids: list = []
        self.wake = threading.Condition()

    def add(self, message_id) -> None:
        with self.wake:
            self.ids.append(message_id)
            self.wake.notify()

    def start(self) -> None:
        threading.Thread(target=self.run, daemon=True).start()

    def run(self) -> None:
        while True:
            with self.wake:
                while not self.ids:
                    self.wake.wait()
            time.sleep(self.look)
            with self.wake:
                batch, self.ids = self.ids, []
            try:
                self.ack(batch)
            except self.plugin.DispatchError as exc:
                out({"error": f"ack {self.name}: {exc}"})


def session(plugin, url: str, token: str, name: str, identified: list, count: int) -> None:
    backoff = 1.0
    while True:
        link = client(plugin, url, token, name)
        acks = Acks(plugin, lambda batch: link.call("mail.ack", ids=batch), name)

        def on_mail(mail: dict) -> None:
            out({"m": str(mail.get("body", "")), "n": name, "t": time.monotonic()})
            acks.add(str(mail["id"]))

        try:
            link.identify()
            if name not in identified:
                identified.append(name)
                if len(identified) == count:
                    out({"ready": count})
            backoff = 1.0
            acks.start()
            while True:
                if link.listen(on_mail) == "superseded":
                    out({"error": f"{name} superseded"})
                    return
        except plugin.ConfigError as exc:
            out({"error": f"{name}: {exc}"})
            return
        except plugin.DispatchError as exc:
            out({"reconnect": name, "why": str(exc)[:200]})
        time.sleep(backoff)
        backoff = min(backoff * 2, plugin.BACKOFF_MAX)


def listeners(plugin, url: str, token: str, base: str, start: int, count: int) -> None:
    identified: list[str] = []
    threads = [threading.Thread(target=session, args=(plugin, url, token, f"{base}-{i:04d}", identified, count),
                                daemon=True) for i in range(start, start + count)]
    for t in threads:
        t.start()
        time.sleep(0.002)  # a plugin crowd does not connect in the same millisecond either
    for t in threads:
        t.join()


def send_loop(plugin, url: str, token: str, name: str, to: str, n: int) -> None:
    link = client(plugin, url, token, name)
    link.identify()
    link.call("send", to=to, body="warm-up")
    cpu0, wall0 = time.process_time(), time.monotonic()
    for i in range(n):
        link.call("send", to=to, body=f"cpu-{i}")
    out({"n": n, "cpu_s": time.process_time() - cpu0, "wall_s": time.monotonic() - wall0})


def floor_receive(plugin, url: str, token: str, name: str) -> None:
    link = client(plugin, url, token, name)
    # The plugin acks what one look at the transcript proved: the look's wait, then one call.
    acks = Acks(plugin, lambda batch: link.call("ack", ids=batch), name, look=plugin.PROOF_POLL)

    def heard(message: dict) -> None:
        mail = message.get("params") or {}
        out({"m": str(mail.get("body", "")), "t": time.monotonic()})
        acks.add(mail["id"])

    acks.start()
    out({"ready": name})
    plugin.HEARTBEAT_SECONDS = 3600.0  # the floor's listen sends no keepalives: one stream for the whole run
    with contextlib.suppress(plugin.DispatchError):  # the server is ended with its section
        link.post("tools/call", {"name": "listen", "arguments": {"name": name}}, tool="listen", on_notice=heard)


def floor_send(plugin, url: str, token: str, name: str) -> None:
    link = client(plugin, url, token, name)
    out({"ready": name})
    for line in sys.stdin:
        to, n, depth, prefix = line.split()
        bodies, lock, errors = iter(range(int(n))), threading.Lock(), []

        def lane() -> None:
            while True:
                with lock:
                    i = next(bodies, None)
                if i is None:
                    return
                try:
                    link.call("send", to=to, body=f"{prefix}-{i}")
                except plugin.DispatchError as exc:
                    errors.append(str(exc))

        lanes = [threading.Thread(target=lane) for _ in range(int(depth))]
        for t in lanes:
            t.start()
        for t in lanes:
            t.join()
        out({"sent": int(n) - len(errors), "errors": errors[:1]})


if __name__ == "__main__":
    role, where, *rest = sys.argv[1:]
    dispatch_plugin = load_plugin(where)
    if role == "listeners":
        url, token, base, start, count = rest
        listeners(dispatch_plugin, url, token, base, int(start), int(count))
    elif role == "send-loop":
        url, token, name, to, n = rest
        send_loop(dispatch_plugin, url, token, name, to, int(n))
    elif role == "floor-receive":
        floor_receive(dispatch_plugin, *rest)
    elif role == "floor-send":
        floor_send(dispatch_plugin, *rest)
    else:
        raise SystemExit(f"unknown role {role!r}")
