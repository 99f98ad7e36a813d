"""What kubelet and containerd write outside a cluster's own places is undone exactly: the kernel
tunables come back when the last cluster stops (not before), shared folders a cluster made are
removed only when nothing but empty folders is left in them, and a cluster's shim sockets, CNI
results and pod logs go while another cluster's stay. Run on a temporary tree standing in for
/proc/sys, /run and /var (the real ones are the cluster tests' business)."""

from __future__ import annotations

import fcntl
import hashlib
import os
from pathlib import Path

import pytest

from tpcontrol.localcluster import hostshare


@pytest.fixture
def machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in machine: tunables, the lock folder and the shared folders under tmp_path."""
    sys_dir = tmp_path / "proc-sys"
    for name, value in zip(hostshare.TUNABLES, ["0", "0", "0", "0", "200", "20000"], strict=True):
        (sys_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (sys_dir / name).write_text(value + "\n")
    locks = tmp_path / "run-tpcontrol-cluster"
    monkeypatch.setattr(hostshare, "PROC_SYS", sys_dir)
    monkeypatch.setattr(hostshare, "LOCKS", locks)
    monkeypatch.setattr(hostshare, "MACHINE_LOCK", locks / "machine.lock")
    monkeypatch.setattr(hostshare, "SAVED_STATE", locks / "machine-before.json")
    kubelet, logs = tmp_path / "var-lib-kubelet", tmp_path / "var-log-pods"
    existing = tmp_path / "var-lib-cni"
    existing.mkdir()
    (existing / "someone-elses").write_text("keep")
    monkeypatch.setattr(hostshare, "SHARED_FOLDERS", (kubelet, logs, existing))
    locks.mkdir()
    return tmp_path


def kubelet_changes(sys_dir: Path) -> None:
    """What kubelet 1.20's setupKernelTunables writes."""
    for name, value in zip(
        hostshare.TUNABLES, ["1", "0", "10", "1", "1000000", "25000000"], strict=True
    ):
        (sys_dir / name).write_text(value)


def test_tunables_and_made_folders_come_back_when_the_last_cluster_stops(machine: Path) -> None:
    sys_dir = machine / "proc-sys"
    with hostshare.machine_locked():
        hostshare.save_machine()
    kubelet_changes(sys_dir)
    (machine / "var-lib-kubelet" / "device-plugins").mkdir(parents=True)
    (machine / "var-lib-kubelet" / "device-plugins" / "kubelet.sock").write_text("")
    (machine / "var-log-pods" / "ns_pod_uid").mkdir(parents=True)
    (machine / "var-lib-cni" / "results").mkdir()

    done = hostshare.restore_machine()
    assert (sys_dir / "kernel/panic").read_text() == "0"
    assert (sys_dir / "kernel/panic_on_oops").read_text() == "0"
    assert (sys_dir / "vm/overcommit_memory").read_text() == "0"
    assert (sys_dir / "kernel/keys/root_maxkeys").read_text() == "200"
    assert "restored kernel.panic=0" in done
    assert not (machine / "var-lib-kubelet").exists()  # made by a cluster: removed
    assert not (machine / "var-log-pods").exists()
    assert (machine / "var-lib-cni" / "someone-elses").read_text() == "keep"  # was there before
    assert (machine / "var-lib-cni" / "results").is_dir()
    assert hostshare.restore_machine() == []  # once


def test_a_made_folder_holding_someone_elses_file_stays(machine: Path) -> None:
    with hostshare.machine_locked():
        hostshare.save_machine()
    (machine / "var-lib-kubelet" / "pods").mkdir(parents=True)
    (machine / "var-lib-kubelet" / "pods" / "data").write_text("a real kubelet's")
    hostshare.restore_machine()
    assert (machine / "var-lib-kubelet" / "pods" / "data").read_text() == "a real kubelet's"


def test_a_second_cluster_does_not_save_what_the_first_ones_kubelet_changed(
    machine: Path,
) -> None:
    sys_dir = machine / "proc-sys"
    with hostshare.machine_locked():
        hostshare.save_machine()
    kubelet_changes(sys_dir)
    with hostshare.machine_locked():
        hostshare.save_machine()  # the second cluster: the saved values are the first ones
    hostshare.restore_machine()
    assert (sys_dir / "kernel/panic").read_text() == "0"


def test_running_clusters_are_told_by_their_held_locks(machine: Path) -> None:
    locks = machine / "run-tpcontrol-cluster"
    (locks / "idle.lock").write_text("1")
    held = open(locks / "busy.lock", "a+")  # noqa: SIM115
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        with hostshare.machine_locked():
            assert hostshare.clusters_running(except_name="me") == ["busy"]
            assert hostshare.clusters_running(except_name="busy") == []
    finally:
        held.close()
    assert hostshare.clusters_running(except_name="me") == []


def test_pod_traces_of_one_cluster_go_and_another_clusters_stay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sockets, results = tmp_path / "run-containerd-s", tmp_path / "cni-results"
    pod_logs, container_logs = tmp_path / "var-log-pods", tmp_path / "var-log-containers"
    for d in (sockets, results, pod_logs, container_logs):
        d.mkdir()
    monkeypatch.setattr(hostshare, "SHIM_SOCKETS", sockets)
    monkeypatch.setattr(hostshare, "CNI_RESULTS", results)
    monkeypatch.setattr(hostshare, "POD_LOGS", pod_logs)
    monkeypatch.setattr(hostshare, "CONTAINER_LOGS", container_logs)
    ours, theirs = tmp_path / "ours.sock", tmp_path / "theirs.sock"

    def shim(address: Path, ident: str) -> Path:
        digest = hashlib.sha256(os.path.join(address, "k8s.io", ident).encode()).hexdigest()
        return sockets / digest

    tasks = tmp_path / "tasks"
    (tasks / "sandbox1").mkdir(parents=True)
    kubelet = tmp_path / "kubelet"
    (kubelet / "pods" / "uid-1").mkdir(parents=True)
    for path in (shim(ours, "sandbox1"), shim(theirs, "sandbox1"), shim(theirs, "sandbox2")):
        path.write_text("")
    (results / "tpc-demo-pods-sandbox1-eth0").write_text("{}")
    (results / "tpc-tests-pods-sandbox2-eth0").write_text("{}")
    (pod_logs / "shop_web-1_uid-1" / "web").mkdir(parents=True)
    (pod_logs / "other_web-2_uid-2").mkdir()
    (container_logs / "web-1_shop_web-x.log").symlink_to(pod_logs / "shop_web-1_uid-1/web/0.log")
    (container_logs / "web-2_other_web-y.log").symlink_to(pod_logs / "other_web-2_uid-2/0.log")

    assert hostshare.remove_pod_traces(ours, tasks, kubelet) == 4
    assert sorted(p.name for p in sockets.iterdir()) == sorted(
        [shim(theirs, "sandbox1").name, shim(theirs, "sandbox2").name]
    )
    assert [p.name for p in results.iterdir()] == ["tpc-tests-pods-sandbox2-eth0"]
    assert [p.name for p in pod_logs.iterdir()] == ["other_web-2_uid-2"]
    assert [p.name for p in container_logs.iterdir()] == ["web-2_other_web-y.log"]
    assert hostshare.remove_pod_traces(ours, tasks, kubelet) == 0
