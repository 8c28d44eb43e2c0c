#!/usr/bin/env python3
"""Build stand-in fixture images for the critest (cri-tools v1.36.0) validation suite and
push them into a local registry (distribution, HTTP API v2, no auth).

    hack/critest-images.py --registry 127.0.0.1:5000 [--busybox /bin/busybox] [--cc gcc]

Every image is built from a busybox (applets as hard links; its shared libraries if it is
dynamic, as Debian's `busybox` package is) plus a few tiny static C helpers compiled here
(fake nginx, nonewprivs, pause). Repositories are named as critest names them without the
registry host, so one registry can be the mirror of registry.k8s.io, k8s.gcr.io and gcr.io
at once:

  registry.k8s.io/e2e-test-images/busybox:1.29-2   default container image (sh, top, sleep, nc, ...)
  registry.k8s.io/e2e-test-images/nginx:1.14-2     web server on :80; PID 1 is "nginx" whose
                                                   cmdline says "master process"; /var/run/nginx.pid
  registry.k8s.io/e2e-test-images/httpd:2.4.39-4   busybox httpd on :80
  registry.k8s.io/e2e-test-images/nonewprivs:1.3   setuid-root binary printing "Effective uid: N"
  registry.k8s.io/pause:3.9, k8s.gcr.io/pause:3.9  the same image (same repo "pause")
  gcr.io/k8s-staging-cri-tools/hostnet-nginx-amd64 as nginx, listening on :12003
  gcr.io/k8s-staging-cri-tools/test-image-user-{uid,username,uid-group,username-group}
                                                   USER 1002 / www-data / 1003:1004 / www-data:1004
  gcr.io/k8s-staging-cri-tools/test-image-predefined-group
                                                   USER 1000, group 50000 lists default-user
  gcr.io/k8s-staging-cri-tools/test-image-{latest,1,2,3}:latest  distinct images
  gcr.io/k8s-staging-cri-tools/test-image-tags:{1,2,3}          one image, three tags
  gcr.io/k8s-staging-cri-tools/test-image-tag:{test,all}        distinct images

NOT reproducible: gcr.io/k8s-staging-cri-tools/test-image-digest@sha256:9700f9a2...
(critest pins the upstream manifest digest). We push test-image-digest:latest only, so the
"public image with digest" spec fails for fixture reasons (manifest unknown).

Python 3 standard library only.
"""
import argparse
import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import urllib.request

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

PASSWD = """root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
bin:x:2:2:bin:/bin:/bin/false
sys:x:3:3:sys:/dev:/bin/false
sync:x:4:100:sync:/bin:/bin/sync
mail:x:8:8:mail:/var/spool/mail:/bin/false
www-data:x:33:33:www-data:/var/www:/bin/false
operator:x:37:37:Operator:/var:/bin/false
nobody:x:65534:65534:nobody:/home:/bin/false
"""
GROUP = """root:x:0:
daemon:x:1:
bin:x:2:
sys:x:3:
adm:x:4:
tty:x:5:
disk:x:6:
wheel:x:10:root
mail:x:12:
www-data:x:33:
operator:x:37:
staff:x:50:
users:x:100:
nogroup:x:65534:
"""

NGINX_C = r"""
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
static pid_t child;
static void on_term(int s) { if (child > 0) kill(child, SIGKILL); _exit(0); }
int main(int argc, char **argv) {
    const char *port = getenv("NGINX_PORT");
    if (!port) port = "80";
    if (argc < 2 || strcmp(argv[1], "master") != 0) {
        /* re-exec so /proc/1/cmdline reads like nginx's master */
        char *nargv[] = {"nginx: master process nginx -g daemon off;", "master", NULL};
        execv("/usr/sbin/nginx", nargv);
        perror("execv"); return 1;
    }
    signal(SIGTERM, on_term); signal(SIGINT, on_term); signal(SIGQUIT, on_term);
    FILE *f = fopen("/var/run/nginx.pid", "w");
    if (f) { fprintf(f, "%d\n", getpid()); fclose(f); }
    child = fork();
    if (child == 0) {
        execl("/bin/busybox", "httpd", "-f", "-v", "-p", port, "-h", "/usr/share/nginx/html", (char *)NULL);
        perror("exec httpd"); _exit(127);
    }
    for (;;) { int st; pid_t p = wait(&st); if (p == child) return WIFEXITED(st) ? WEXITSTATUS(st) : 1; if (p < 0) pause(); }
}
"""
PGREP_SH = """#!/bin/sh
# pgrep NAME: the pids whose comm is NAME; exit 1 when there are none.
found=1
for d in /proc/[0-9]*; do
    [ "$(cat "$d/comm" 2>/dev/null)" = "$1" ] && echo "${d#/proc/}" && found=0
done
exit $found
"""
IPCS_SH = """#!/bin/sh
# ipcs -m: the shared memory segments of this IPC namespace (key, shmid, ...).
cat /proc/sysvipc/shm
"""
NNP_C = r"""
#include <stdio.h>
#include <unistd.h>
int main(void) { printf("Effective uid: %d\n", (int)geteuid()); return 0; }
"""
PAUSE_C = r"""
#include <signal.h>
#include <unistd.h>
#include <stdlib.h>
static void die(int s) { _exit(0); }
int main(void) { signal(SIGTERM, die); signal(SIGINT, die); for (;;) pause(); }
"""


def sha(b):
    return "sha256:" + hashlib.sha256(b).hexdigest()


class Layer:
    def __init__(self):
        self.buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buf, mode="w", format=tarfile.PAX_FORMAT)
        self.seen = set()

    def _dirs(self, path):
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d and d not in self.seen:
                self.dir(d)

    def _add(self, path, kind, mode, data=None, uid=0, gid=0, linkname=""):
        """Adds one entry (and its missing parent dirs) unless the path is there already."""
        path = path.strip("/")
        if path in self.seen:
            return
        self._dirs(path)
        self.seen.add(path)
        ti = tarfile.TarInfo(path)
        ti.type = kind
        ti.mode = mode
        ti.uid, ti.gid = uid, gid
        ti.linkname = linkname
        ti.mtime = 0
        if data is None:
            self.tar.addfile(ti)
        else:
            ti.size = len(data)
            self.tar.addfile(ti, io.BytesIO(data))

    def dir(self, path, mode=0o755):
        self._add(path, tarfile.DIRTYPE, mode)

    def file(self, path, data, mode=0o644, uid=0, gid=0):
        if isinstance(data, str):
            data = data.encode()
        self._add(path, tarfile.REGTYPE, mode, data, uid, gid)

    def symlink(self, path, target):
        self._add(path, tarfile.SYMTYPE, 0o777, linkname=target)

    def hardlink(self, path, target):
        self._add(path, tarfile.LNKTYPE, 0o755, linkname=target.strip("/"))

    def finish(self):
        self.tar.close()
        raw = self.buf.getvalue()
        gz = gzip.compress(raw, compresslevel=6, mtime=0)
        return sha(raw), gz


class Registry:
    def __init__(self, addr):
        self.base = "http://" + addr
        self.pushed = set()

    def req(self, method, url, data=None, headers=None):
        r = urllib.request.Request(url if url.startswith("http") else self.base + url,
                                   data=data, method=method, headers=headers or {})
        return urllib.request.urlopen(r, timeout=60)

    def blob(self, repo, data):
        d = sha(data)
        if (repo, d) in self.pushed:
            return d
        try:
            self.req("HEAD", f"/v2/{repo}/blobs/{d}")
            self.pushed.add((repo, d))
            return d
        except urllib.error.HTTPError:
            pass
        resp = self.req("POST", f"/v2/{repo}/blobs/uploads/", data=b"")
        loc = resp.headers["Location"]
        if not loc.startswith("http"):
            loc = self.base + loc
        loc += ("&" if "?" in loc else "?") + "digest=" + d
        self.req("PUT", loc, data=data, headers={"Content-Type": "application/octet-stream",
                                                 "Content-Length": str(len(data))})
        self.pushed.add((repo, d))
        return d

    def manifest(self, repo, tag, body):
        self.req("PUT", f"/v2/{repo}/manifests/{tag}", data=body,
                 headers={"Content-Type": OCI_MANIFEST})


def compile_helpers(cc, workdir):
    out = {}
    for name, src in (("nginx", NGINX_C), ("nnp", NNP_C), ("pause", PAUSE_C)):
        c = os.path.join(workdir, name + ".c")
        b = os.path.join(workdir, name)
        with open(c, "w") as f:
            f.write(src)
        subprocess.run([cc, "-static", "-Os", "-s", "-o", b, c], check=True)
        with open(b, "rb") as f:
            out[name] = f.read()
    return out


def shared_libraries(binary):
    """The absolute paths of the shared objects `binary` loads (none for a static one)."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True).stdout
    libs = []
    for line in out.splitlines():
        parts = line.split()
        if "=>" in parts and len(parts) > parts.index("=>") + 1:
            path = parts[parts.index("=>") + 1]
        elif parts and parts[0].startswith("/"):
            path = parts[0]
        else:
            continue
        if os.path.isabs(path) and os.path.exists(path):
            libs.append(path)
    return libs


def base_layer(busybox):
    with open(busybox, "rb") as f:
        bb = f.read()
    applets = subprocess.run([busybox, "--list-full"], check=True, capture_output=True,
                             text=True).stdout.split()
    l = Layer()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "root", "home", "var/run", "var/www",
              "proc", "sys", "dev", "usr/local/bin"):
        l.dir(d)
    l.dir("tmp", 0o1777)
    l.dir("var/tmp", 0o1777)
    l.file("bin/busybox", bb, 0o755)
    # A dynamic busybox (Debian's `busybox` package) brings its libraries along. Prefer it:
    # Debian's static busybox runs applets inside its shell whatever is on disk, so a masked
    # /bin/ls (critest's MaskedPaths spec) would still run; the dynamic one execs them.
    for lib in shared_libraries(busybox):
        with open(lib, "rb") as f:
            l.file(lib, f.read(), 0o755)
    # Hard links, as in the upstream busybox images: masking one applet (critest masks
    # /bin/ls) must not mask the busybox binary a symlink would resolve to.
    for a in applets:
        if a == "bin/busybox":
            continue
        l.hardlink(a, "bin/busybox")
    # Debian's static busybox has neither pgrep nor ipcs, which critest execs.
    l.file("usr/bin/pgrep", PGREP_SH, 0o755)
    l.file("usr/bin/ipcs", IPCS_SH, 0o755)
    l.file("etc/passwd", PASSWD)
    l.file("etc/group", GROUP)
    l.file("etc/hostname", "localhost\n")
    l.file("etc/nsswitch.conf", "hosts: files dns\npasswd: files\ngroup: files\n")
    return l.finish()


def extra_layer(files):
    l = Layer()
    for path, (data, mode) in files.items():
        l.file(path, data, mode)
    return l.finish()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--registry", required=True, help="host:port of the registry")
    ap.add_argument("--busybox", default="/bin/busybox")
    ap.add_argument("--cc", default="gcc")
    args = ap.parse_args()

    reg = Registry(args.registry)
    with tempfile.TemporaryDirectory() as td:
        helpers = compile_helpers(args.cc, td)
    base = base_layer(args.busybox)

    def push(repo, tags, extra=None, user="", cmd=("sh",), entrypoint=None, env=(),
             ports=(), layers_base=True, labels=None):
        layers = [base] if layers_base else []
        if extra:
            layers.append(extra_layer(extra))
        cfg = {"Env": [PATH_ENV] + list(env), "Cmd": list(cmd) if cmd else None,
               "WorkingDir": "/"}
        if entrypoint:
            cfg["Entrypoint"] = list(entrypoint)
        if user:
            cfg["User"] = user
        if ports:
            cfg["ExposedPorts"] = {f"{p}/tcp": {} for p in ports}
        if labels:
            cfg["Labels"] = labels
        config = {"architecture": "amd64", "os": "linux", "created": "2024-01-01T00:00:00Z",
                  "config": {k: v for k, v in cfg.items() if v is not None},
                  "rootfs": {"type": "layers", "diff_ids": [d for d, _ in layers]},
                  "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "critest-images.py"}
                              for _ in layers]}
        cbytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
        cd = reg.blob(repo, cbytes)
        ldescs = []
        for _, gz in layers:
            ldescs.append({"mediaType": OCI_LAYER, "digest": reg.blob(repo, gz), "size": len(gz)})
        man = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
               "config": {"mediaType": OCI_CONFIG, "digest": cd, "size": len(cbytes)},
               "layers": ldescs}
        mbytes = json.dumps(man, sort_keys=True, separators=(",", ":")).encode()
        for t in tags:
            reg.manifest(repo, t, mbytes)
        print(f"pushed {repo}:{','.join(tags)} {sha(mbytes)}", flush=True)

    marker = lambda name: {name: (name + "\n", 0o644)}
    html = {"usr/share/nginx/html/index.html": ("<html><body>Welcome to nginx!</body></html>\n", 0o644),
            "usr/sbin/nginx": (helpers["nginx"], 0o755)}
    e2e = "e2e-test-images/"
    stg = "k8s-staging-cri-tools/"

    push(e2e + "busybox", ["1.29-2", "latest"])
    push(e2e + "nginx", ["1.14-2"], extra=html, cmd=None, entrypoint=["/usr/sbin/nginx"],
         ports=[80])
    push(stg + "hostnet-nginx-amd64", ["latest"], extra=html, cmd=None,
         entrypoint=["/usr/sbin/nginx"], env=["NGINX_PORT=12003"], ports=[12003])
    push(e2e + "httpd", ["2.4.39-4"],
         extra={"usr/local/apache2/htdocs/index.html": ("<html><body><h1>It works!</h1></body></html>\n", 0o644)},
         # Apache's httpd logs its start; busybox httpd logs nothing until a request comes.
         cmd=["sh", "-c", "echo 'httpd: serving /usr/local/apache2/htdocs on :80'; "
              "exec httpd -f -v -p 80 -h /usr/local/apache2/htdocs"], ports=[80])
    push(e2e + "nonewprivs", ["1.3"], extra={"usr/local/bin/nnp": (helpers["nnp"], 0o4755)},
         cmd=None, entrypoint=["/usr/local/bin/nnp"])
    push("pause", ["3.9"], layers_base=False, extra={"pause": (helpers["pause"], 0o755)},
         cmd=None, entrypoint=["/pause"])

    for name, user in (("test-image-user-uid", "1002"), ("test-image-user-username", "www-data"),
                       ("test-image-user-uid-group", "1003:1004"),
                       ("test-image-user-username-group", "www-data:1004")):
        push(stg + name, ["latest"], user=user)
    pg_passwd = PASSWD + "default-user:x:1000:1000:Linux User,,,:/home/default-user:/bin/sh\n"
    pg_group = GROUP + "default-user:x:1000:\ngroup-defined-in-image:x:50000:default-user\n"
    push(stg + "test-image-predefined-group", ["latest"], user="1000",
         extra={"etc/passwd": (pg_passwd, 0o644), "etc/group": (pg_group, 0o644)})

    for name in ("test-image-1", "test-image-2", "test-image-3", "test-image-latest",
                 "test-image-digest"):
        push(stg + name, ["latest"], extra=marker(name))
    push(stg + "test-image-tags", ["1", "2", "3"], extra=marker("same-image"))
    for tag in ("test", "all"):
        push(stg + "test-image-tag", [tag], extra=marker(tag))
    return 0


if __name__ == "__main__":
    sys.exit(main())
