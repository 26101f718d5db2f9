#!/usr/bin/env python3
"""Keeps deploy/ honest against the real `trellis` binary (run by .ci/run after the build).

- every YAML file (and the Terraform cloud-init template, rendered with sample values) parses;
- every agent config under deploy/ (TOML files, and TOML inside the ConfigMap and the
  cloud-init files) passes `trellis validate`;
- every `trellis ...` command the artefacts run names a real subcommand, and each of its
  flags appears in that subcommand's `--help`;
- the cloud-init unit is deploy/systemd/trellis.service verbatim; the Terraform modules pass
  every variable the template uses and declare every `var.` they read;
- every metric the Grafana dashboard queries exists in a real agent's /metrics (histogram
  `_bucket`/`_sum`/`_count` allowed), and every label it filters or groups a series by is
  on that series once traffic has flowed;
- `systemd-analyze verify` finds nothing in the unit, where systemd-analyze is installed.

Usage: python3 .ci/deploy_check.py   (TRELLIS_BIN overrides $CARGO_TARGET_DIR/debug/trellis)
"""

import base64
import glob
import http.server
import json
import os
import random
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
BIN = Path(os.environ.get("TRELLIS_BIN") or ROOT / os.environ.get("CARGO_TARGET_DIR", "target") / "debug" / "trellis")
UNIT = DEPLOY / "systemd" / "trellis.service"
TEMPLATE = DEPLOY / "terraform" / "templates" / "user-data.yaml.tftpl"
# Sample values for the Terraform template (TEST-NET addresses).
TEMPLATE_VARS = {
    "name": "aws-1",
    "advertise": "192.0.2.10",
    "peer_port": "7946",
    "join": '["192.0.2.10:7946", "198.51.100.10:7946"]',
    "cloud": "aws",
    "region": "eu-west-1",
    "zone": "eu-west-1a",
    "unit_b64": base64.b64encode(UNIT.read_bytes()).decode(),
    "ca_b64": base64.b64encode(b"sample ca.pem").decode(),
    "cert_b64": base64.b64encode(b"sample node.pem").decode(),
    "key_b64": base64.b64encode(b"sample node.key").decode(),
    "trellis_url": "https://downloads.example.invalid/trellis",
    "trellis_sha256": "0" * 64,
}
# Families the dashboard must cover (issue 7, item 7).
REQUIRED_METRICS = [
    "trellis_members",
    "trellis_peers",
    "trellis_gossip_bytes_in_total",
    "trellis_gossip_bytes_out_total",
    "trellis_handshakes_refused_total",
    "trellis_policy_objects",
    "trellis_requests_total",
    "trellis_request_duration_seconds_bucket",
    "trellis_forward_outbound_total",
    "trellis_ratelimit_admitted_total",
    "trellis_ratelimit_refused_total",
]

failures = []


def check(ok, what):
    print(("ok    " if ok else "FAIL  ") + what)
    if not ok:
        failures.append(what)
    return ok


def trellis(*args, timeout=30):
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=timeout,
                          env={k: v for k, v in os.environ.items() if k != "TRELLIS_HTTP_ADDR"})


def render_template(text, values):
    def sub(m):
        key = m.group(1)
        if key not in values:
            raise KeyError(f"{TEMPLATE.name} uses ${{{key}}} but the check has no sample for it")
        return values[key]
    return re.sub(r"\$\{([a-z_0-9]+)\}", sub, text)


def yaml_documents():
    """(label, [documents]) for every YAML file, the template rendered."""
    out = []
    for path in sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml")):
        out.append((str(path.relative_to(ROOT)), path.read_text()))
    out.append((str(TEMPLATE.relative_to(ROOT)) + " (rendered)", render_template(TEMPLATE.read_text(), TEMPLATE_VARS)))
    docs = []
    for label, text in out:
        try:
            parsed = [d for d in yaml.safe_load_all(text) if d is not None]
            check(bool(parsed), f"{label}: YAML parses ({len(parsed)} documents)")
            docs.append((label, parsed))
        except yaml.YAMLError as e:
            check(False, f"{label}: YAML parses: {e}")
    return dict(docs)


# ---------------------------------------------------------------------------------------
# Agent configs

def daemonset(docs):
    for d in docs.get("deploy/kubernetes/daemonset.yaml", []):
        if d.get("kind") == "DaemonSet":
            return d
    return None


def agent_configs(docs):
    """(label, TOML text) for every agent config under deploy/."""
    configs = [(str(p.relative_to(ROOT)), p.read_text()) for p in sorted(DEPLOY.rglob("*.toml"))]
    ds = daemonset(docs)
    agent_args = ds["spec"]["template"]["spec"]["containers"][0]["args"] if ds else []
    for label, parsed in docs.items():
        for d in parsed:
            if isinstance(d, dict) and d.get("kind") == "ConfigMap":
                for key, text in d.get("data", {}).items():
                    if key.endswith(".toml"):
                        # The DaemonSet gives --advertise per node (the node's IP); validate
                        # the shared file with a sample value in its place.
                        if "--advertise" in agent_args and not re.search(r"^\s*advertise\s*=", text, re.M):
                            text = 'advertise = "192.0.2.1:7946"\n' + text
                        configs.append((f"{label}: data.{key}", text))
            if isinstance(d, dict):
                for f in d.get("write_files", []) or []:
                    if f.get("path", "").endswith(".toml"):
                        configs.append((f"{label}: {f['path']}", f["content"]))
    return configs


def check_configs(docs):
    configs = agent_configs(docs)
    check(len(configs) >= 4, f"found {len(configs)} agent configs under deploy/")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, text) in enumerate(configs):
            path = Path(tmp) / f"agent-{i}.toml"
            path.write_text(text)
            r = trellis("validate", str(path))
            # `validate` answers `<file>: ok (<what it read>)`.
            ok = re.search(r": ok( \(.*\))?$", r.stdout.strip()) is not None
            check(r.returncode == 0 and ok,
                  f"trellis validate {label}" + ("" if r.returncode == 0 else f": {r.stderr.strip()}"))


# ---------------------------------------------------------------------------------------
# CLI commands the artefacts run

def commands(docs):
    """(label, argv) of every `trellis ...` command in the artefacts."""
    found = []

    def from_shell(label, script):
        for line in re.sub(r"\\\n", " ", script).splitlines():
            lex = shlex.shlex(line, posix=True, punctuation_chars=True)
            lex.whitespace_split = True
            lex.commenters = "#"
            try:
                tokens = list(lex)
            except ValueError as e:
                check(False, f"{label}: cannot split {line!r}: {e}")
                continue
            # Simple commands between ; && || | ( and ).
            segment = []
            for t in tokens + [";"]:
                if t and set(t) <= set("();<>|&"):
                    words = segment[1:] if segment[:1] in (["do"], ["then"], ["{"]) else segment
                    for i, w in enumerate(words):
                        # `trellis ...`, or `docker compose ... exec SERVICE trellis ...`.
                        if w in ("trellis", "/usr/local/bin/trellis") and (i == 0 or (i >= 2 and words[i - 2] == "exec")):
                            found.append((label, words[i + 1:]))
                            break
                    segment = []
                else:
                    segment.append(t)

    compose = docs.get("deploy/container/compose.yaml", [{}])[0]
    for name, svc in compose.get("services", {}).items():
        label = f"compose {name}"
        cmd = svc.get("command")
        entry = svc.get("entrypoint")
        if entry and entry[0] == "/bin/sh":
            for script in cmd:
                from_shell(label, script)
        elif isinstance(cmd, list):
            found.append((label, cmd))
        test = svc.get("healthcheck", {}).get("test", [])
        if test[:2] == ["CMD", "trellis"]:
            found.append((label + " healthcheck", test[2:]))
    ds = daemonset(docs)
    if ds:
        pod = ds["spec"]["template"]["spec"]
        for c in pod.get("initContainers", []):
            for script in c.get("args", []):
                from_shell(f"daemonset {c['name']}", script)
        for c in pod["containers"]:
            found.append((f"daemonset {c['name']}", c["args"]))
            pre = c["lifecycle"]["preStop"]["exec"]["command"]
            found.append((f"daemonset {c['name']} preStop", pre[1:]))
    for label, parsed in docs.items():
        for d in parsed:
            if isinstance(d, dict):
                for cmd in d.get("runcmd", []) or []:
                    if isinstance(cmd, list) and cmd[0] == "/usr/local/bin/trellis":
                        found.append((f"{label} runcmd", cmd[1:]))
    for line in UNIT.read_text().splitlines():
        if line.startswith(("ExecStart=", "ExecStartPre=")):
            from_shell(f"trellis.service {line.split('=')[0]}", line.split("=", 1)[1])
    readme = (DEPLOY / "README.md").read_text() if (DEPLOY / "README.md").exists() else ""
    for block in re.findall(r"```sh\n(.*?)```", readme, re.S):
        from_shell("deploy/README.md", block)
    return found


help_cache = {}


def help_flags(sub):
    if sub not in help_cache:
        r = trellis(*sub, "--help")
        help_cache[sub] = set(re.findall(r"(--[a-z][a-z0-9-]*)", r.stdout)) if r.returncode == 0 else None
    return help_cache[sub]


def check_commands(docs):
    cmds = commands(docs)
    check(len(cmds) >= 10, f"found {len(cmds)} trellis commands in the artefacts")
    for label, argv in cmds:
        positional = [a for a in argv if not a.startswith("-")]
        sub = tuple(positional[:2]) if positional[:1] in (["ca"], ["cert"], ["policy"]) else tuple(positional[:1])
        flags = help_flags(sub)
        if flags is None:
            check(False, f"{label}: `trellis {' '.join(sub)}` is not a subcommand")
            continue
        used = [a.split("=")[0] for a in argv if a.startswith("--")]
        unknown = [f for f in used if f not in flags]
        check(not unknown, f"{label}: trellis {' '.join(sub)} {' '.join(used)}"
              + (f": unknown flags {unknown}" if unknown else ""))


# ---------------------------------------------------------------------------------------
# Cross-file consistency

def check_consistency(docs):
    for label, parsed in docs.items():
        for d in parsed:
            for f in (d.get("write_files", []) or []) if isinstance(d, dict) else []:
                if f.get("path") == "/etc/systemd/system/trellis.service":
                    content = f["content"]
                    if f.get("encoding") == "b64":
                        content = base64.b64decode(content).decode()
                    check(content == UNIT.read_text(), f"{label}: the unit is deploy/systemd/trellis.service verbatim")
    tf = DEPLOY / "terraform"
    used = set(re.findall(r"\$\{([a-z_0-9]+)\}", TEMPLATE.read_text()))
    for module in sorted((tf / "modules").iterdir()):
        main = (module / "main.tf").read_text()
        declared = set(re.findall(r'variable "([a-z_0-9]+)"', (module / "variables.tf").read_text()))
        reads = set(re.findall(r"\bvar\.([a-z_0-9]+)", main + (module / "outputs.tf").read_text()))
        check(reads <= declared, f"terraform/modules/{module.name}: declares every var it reads"
              + (f" (missing {sorted(reads - declared)})" if reads - declared else ""))
        call = re.search(r"templatefile\([^{]*\{(.*?)\n\s*\}\)", main, re.S)
        passed = set(re.findall(r"^\s*([a-z_0-9]+)\s*=", call.group(1), re.M)) if call else set()
        check(used <= passed, f"terraform/modules/{module.name}: passes every template variable"
              + (f" (missing {sorted(used - passed)})" if used - passed else ""))
        root = (tf / "main.tf").read_text()
        block = re.search(rf'module "{module.name}" \{{(.*?)\n\}}', root, re.S)
        args = set(re.findall(r"^\s*([a-z_0-9]+)\s*=", block.group(1), re.M)) - {"source"} if block else set()
        required = {v for v in declared if not re.search(
            rf'variable "{v}" \{{[^}}]*default', (module / "variables.tf").read_text())}
        check(block and required <= args <= declared,
              f"terraform/main.tf: module {module.name} gets its required variables and no unknown ones")
    root_vars = set(re.findall(r'variable "([a-z_0-9]+)"', (tf / "variables.tf").read_text()))
    root_reads = set(re.findall(r"\bvar\.([a-z_0-9]+)", "".join(p.read_text() for p in tf.glob("*.tf"))))
    check(root_reads <= root_vars, "terraform/: the root declares every var it reads")
    check_container(docs)
    ds = daemonset(docs)
    pod = ds["spec"]["template"]["spec"] if ds else {}
    agent = (pod.get("containers") or [{}])[0]
    check(pod.get("hostNetwork") is True, "daemonset: hostNetwork")
    check(agent.get("readinessProbe", {}).get("httpGet", {}).get("path") == "/v1/health", "daemonset: readiness on /v1/health")
    check("leave" in agent.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", []),
          "daemonset: preStop leaves gracefully")
    unit = UNIT.read_text()
    for line in ["Type=notify", "KillSignal=SIGINT", "StateDirectory=trellis", "ExecReload=/bin/kill -HUP $MAINPID",
                 "NoNewPrivileges=yes", "ProtectSystem=strict", "CapabilityBoundingSet=",
                 "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX", "SystemCallFilter=@system-service"]:
        check(line in unit.splitlines(), f"trellis.service: {line}")


def check_container(docs):
    """The image copies every workspace member (cargo needs them all); compose agents bind the
    address their network gives them and join only the other agents."""
    containerfile = (DEPLOY / "container" / "Containerfile").read_text()
    members = re.search(r"members\s*=\s*\[(.*?)\]", (ROOT / "Cargo.toml").read_text(), re.S).group(1)
    copied = re.findall(r"^COPY (\S+) \1$", containerfile, re.M)
    # A member inside a copied directory (node/core in node) is copied with it.
    missing = [m for m in re.findall(r'"([^"]+)"', members) if not any(m == c or m.startswith(c + "/") for c in copied)]
    check(not missing, "Containerfile: copies every workspace member" + (f" (missing {missing})" if missing else ""))
    services = docs.get("deploy/container/compose.yaml", [{}])[0].get("services", {})
    agents = {n: s for n, s in services.items() if (s.get("command") or [None])[0] == "agent"}
    addrs = {n: next(iter(s["networks"].values()))["ipv4_address"] for n, s in agents.items()}
    for name, svc in agents.items():
        cmd = svc["command"]
        flag = lambda f: [cmd[i + 1] for i, a in enumerate(cmd) if a == f]
        joins = {j.split(":")[0] for j in flag("--join")}
        check(flag("--bind") == [f"{addrs[name]}:7946"] and joins == set(addrs.values()) - {addrs[name]}
              and flag("--name") == [name],
              f"compose {name}: named {name}, binds {addrs[name]}:7946, joins the other agents")
    check(len(agents) == 3, f"compose: {len(agents)} agents")
    # Each agent mounts the volume its own certificate was issued into.
    pki = services.get("pki", {})
    issued = dict(re.findall(r"cert issue .*?--name (\S+) --out (\S+)", "\n".join(pki.get("command", []))))
    pki_vols = {v.split(":")[1]: v.split(":")[0] for v in pki.get("volumes", [])}
    for name, svc in agents.items():
        tls = [v.split(":")[0] for v in svc.get("volumes", []) if v.split(":")[1] == "/etc/trellis/tls"]
        check(name in issued and tls == [pki_vols.get(issued[name])],
              f"compose {name}: mounts the volume pki issued its certificate into ({tls})")


def check_unit_with_systemd():
    analyze = shutil.which("systemd-analyze")
    if not analyze or not Path("/usr/lib/systemd/system/sysinit.target").exists():
        print("skip  systemd-analyze verify (systemd is not installed here)")
        return
    with tempfile.TemporaryDirectory() as root:
        # An image root with the unit, the binary where ExecStart expects it, and the host's targets.
        for d in ["usr/local/bin", "etc/systemd/system", "usr/lib/systemd", "bin"]:
            os.makedirs(f"{root}/{d}", exist_ok=True)
        shutil.copy(BIN, f"{root}/usr/local/bin/trellis")
        shutil.copy("/bin/kill", f"{root}/bin/kill")
        shutil.copy(UNIT, f"{root}/etc/systemd/system/trellis.service")
        shutil.copytree("/usr/lib/systemd/system", f"{root}/usr/lib/systemd/system", symlinks=True)
        r = subprocess.run([analyze, "verify", f"--root={root}", "trellis.service"], capture_output=True, text=True)
        out = (r.stdout + r.stderr).strip()
        check(r.returncode == 0 and not out, "systemd-analyze verify trellis.service" + (f": {out}" if out else ""))


# ---------------------------------------------------------------------------------------
# Grafana dashboard against a real agent

def free_ip():
    for _ in range(100):
        ip = f"127.{random.randint(200, 250)}.{random.randint(0, 255)}.2"
        try:
            with socket.socket() as t, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                t.bind((ip, 8500))
                u.bind((ip, 7946))
                return ip
        except OSError:
            continue
    raise RuntimeError("no free loopback address")


def get(url, headers=None, data=None, method=None):
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.status, r.read().decode()


def check_resolvers(ip, tmp):
    """deploy/dns: each file sends the trellis domain to 127.0.0.1:8600, the agent's default
    DNS address; the dnsmasq file, run by a real dnsmasq (where installed) against the agent
    of `real_metrics` (listening on its own loopback address), answers web.service.trellis."""
    import configparser
    dns_dir = DEPLOY / "dns"
    resolved = configparser.ConfigParser()
    resolved.read(dns_dir / "resolved-trellis.conf")
    check(resolved.get("Resolve", "DNS", fallback="") == "127.0.0.1:8600"
          and resolved.get("Resolve", "Domains", fallback="") == "~trellis",
          "dns: the systemd-resolved drop-in routes ~trellis to 127.0.0.1:8600")
    unbound = (dns_dir / "unbound-trellis.conf").read_text()
    check("stub-addr: 127.0.0.1@8600" in unbound and 'name: "trellis"' in unbound,
          "dns: the unbound stub zone for trellis points at 127.0.0.1@8600")
    dnsmasq_conf = (dns_dir / "dnsmasq-trellis.conf").read_text()
    check("server=/trellis/127.0.0.1#8600" in dnsmasq_conf, "dns: the dnsmasq file forwards /trellis/ to 127.0.0.1#8600")
    check("8600" in trellis("agent", "--help").stdout, "dns: `trellis agent --help` documents port 8600 as the default")
    dnsmasq, dig = shutil.which("dnsmasq"), shutil.which("dig")
    if not dnsmasq or not dig:
        print("skip  dnsmasq forwarding to a real agent (dnsmasq or dig is not installed here)")
        return
    conf = f"{tmp}/dnsmasq.conf"
    Path(conf).write_text(dnsmasq_conf.replace("127.0.0.1#8600", f"{ip}#8600"))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.bind((ip, 0))
        port = u.getsockname()[1]
    proc = subprocess.Popen([dnsmasq, "-k", f"--conf-file={conf}", "--no-resolv", "--no-hosts", "--bind-interfaces",
                             f"--listen-address={ip}", f"--port={port}", "--user=root", "--pid-file="],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        answer = ""
        for _ in range(50):
            r = subprocess.run([dig, f"@{ip}", "-p", str(port), "web.service.trellis", "+short", "+time=1", "+tries=1"],
                               capture_output=True, text=True, timeout=10)
            answer = r.stdout.strip()
            if answer == ip:
                break
            time.sleep(0.1)
        check(answer == ip, f"dns: dnsmasq with deploy/dns/dnsmasq-trellis.conf answers web.service.trellis from the agent ({answer!r})")
    finally:
        proc.kill()
        proc.wait()


def real_metrics():
    """/metrics of a real agent after one proxied HTTP request to a local instance."""
    ip = free_ip()
    class Ok(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "3")
            self.end_headers()
            self.wfile.write(b"ok\n")

        def log_message(self, *_):
            pass

    backend = http.server.ThreadingHTTPServer((ip, 0), Ok)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    tmp = tempfile.mkdtemp(prefix="trellis-deploy-check-")
    agent = None
    try:
        for args in (["ca", "init", "--dir", f"{tmp}/ca"],
                     ["cert", "issue", "--ca-dir", f"{tmp}/ca", "--name", "deploy-check", "--out", f"{tmp}/tls"]):
            r = trellis(*args)
            assert r.returncode == 0, r.stderr
        log = open(f"{tmp}/agent.log", "w")
        agent = subprocess.Popen([str(BIN), "agent", "--name", "deploy-check", "--profile", "fast",
                                  "--bind", f"{ip}:7946", "--api", f"{ip}:8500", "--proxy", f"{ip}:15001",
                                  "--data-dir", f"{tmp}/data", "--tls-dir", f"{tmp}/tls"],
                                 stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        api = f"http://{ip}:8500"
        deadline = time.time() + 20
        while True:
            try:
                get(f"{api}/v1/health")
                break
            except OSError:
                if time.time() > deadline or agent.poll() is not None:
                    raise RuntimeError("agent did not come up:\n" + open(f"{tmp}/agent.log").read())
                time.sleep(0.2)
        body = json.dumps({"service": "web", "address": ip, "port": backend.server_address[1], "protocol": "http"})
        get(f"{api}/v1/agent/services/web-1", {"Content-Type": "application/json"}, body.encode(), "PUT")
        body = json.dumps({"service": "web", "requests_per_second": 1000})
        get(f"{api}/v1/policy/ratelimits/web", {"Content-Type": "application/json"}, body.encode(), "PUT")
        # Requests through the proxy until the per-service and per-limit series exist (the
        # catalog and the limit reach the proxy asynchronously); bounded: 100 tries, 100 ms apart.
        wanted = ["trellis_requests_total{", "trellis_request_duration_seconds_bucket{",
                  "trellis_ratelimit_admitted_total{"]
        for _ in range(100):
            try:
                get(f"http://{ip}:15001/", {"Host": "web"})
            except OSError:
                pass
            text = get(f"{api}/metrics")[1]
            if all(w in text for w in wanted):
                break
            time.sleep(0.1)
        check_resolvers(ip, tmp)
        return text
    finally:
        if agent:
            agent.send_signal(2)
            try:
                agent.wait(10)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
        backend.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def exposed(text):
    """metric name -> set of label names seen on its samples."""
    names = {}
    for line in text.splitlines():
        m = re.match(r"# TYPE (\S+) (\S+)", line)
        if m:
            name, kind = m.groups()
            names.setdefault(name, set())
            if kind == "histogram":
                for suffix in ("_bucket", "_sum", "_count"):
                    names.setdefault(name + suffix, set())
        elif line and not line.startswith("#"):
            m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s", line)
            if m:
                names.setdefault(m.group(1), set()).update(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="', m.group(3) or ""))
    return names


def queries(dashboard):
    out = []

    def walk(v):
        if isinstance(v, dict):
            for k, x in v.items():
                if k in ("expr", "query", "definition") and isinstance(x, str):
                    out.append(x)
                else:
                    walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
    walk(dashboard)
    return out


def check_dashboard():
    path = DEPLOY / "grafana" / "trellis.json"
    dashboard = json.loads(path.read_text())
    exprs = queries(dashboard)
    check(len(exprs) >= 10, f"grafana/trellis.json: {len(exprs)} queries")
    metrics = exposed(real_metrics())
    check(len(metrics) >= 30, f"a real agent exports {len(metrics)} metric names")
    used = set()
    label_checks = 0
    for expr in exprs:
        for name, matchers in re.findall(r"\b(trellis_[a-zA-Z0-9_:]+)(\{[^}]*\})?", expr):
            used.add(name)
            if name not in metrics:
                check(False, f"grafana: {name} (in `{expr}`) is not in /metrics")
                continue
            labels = set(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)', matchers)) - {"instance", "job"}
            seen = metrics[name]
            if seen:
                label_checks += 1
                missing = labels - seen
                if missing:
                    check(False, f"grafana: {name}{{{','.join(sorted(labels))}}}: labels {sorted(missing)} not on the series")
        for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
            names = [n for n, _ in re.findall(r"\b(trellis_[a-zA-Z0-9_:]+)(\{[^}]*\})?", expr)]
            for label in [g.strip() for g in group.split(",") if g.strip()]:
                if label in ("instance", "job"):
                    continue
                label_checks += 1
                if not any(label in metrics.get(n, set()) for n in names):
                    check(False, f"grafana: `by ({label})` in `{expr}` is not a label of {sorted(set(names))}")
    check(all(n in metrics for n in used), f"grafana: all {len(used)} metric names exist in /metrics")
    check(label_checks >= 20, f"grafana: {label_checks} label matchers and groupings checked against the series")
    missing = [m for m in REQUIRED_METRICS if m not in used]
    check(not missing, "grafana: covers members, gossip, handshakes, policy, requests, latency, forwarding, rate limits"
          + (f" (missing {missing})" if missing else ""))


def main():
    if not BIN.is_file():
        sys.exit(f"no trellis binary at {BIN}; run `cargo build -p trellis-node --bin trellis` or set TRELLIS_BIN")
    docs = yaml_documents()
    check_configs(docs)
    check_commands(docs)
    check_consistency(docs)
    check_unit_with_systemd()
    check_dashboard()
    print(f"deploy check: {len(failures)} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
