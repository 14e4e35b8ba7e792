//! Privileged: the kernel programs, attached to a cgroup this test creates, capture a connection
//! from an enrolled pod cgroup and leave a non-enrolled one alone.

use std::{
    io::Read as _,
    net::{SocketAddr, SocketAddrV4, TcpListener},
    time::Duration,
};

use mesh_common::Counter;
use mesh_daemon::{
    ebpf::loader::{Datapath, DatapathConfig},
    proxy::{outbound::conn_key, route::orig_dst_addr},
};
use nodemesh_tests::{
    cgroup::TestCgroup, footprint::Footprint, mesh_app, netns::Netns, require_root, unique,
};

fn app(cg: &std::path::Path, ns: &Netns, args: &[&str]) -> String {
    String::from_utf8_lossy(&mesh_app(cg, ns.name(), args).stdout).into_owned()
}

#[test]
fn kernel_capture_records_destination_and_cgroup_sockmap_off() {
    kernel_capture_records_destination_and_cgroup(false);
}

/// `--sockmap on` adds the splice verdict; capture must not change, and everything still detaches.
#[test]
fn kernel_capture_records_destination_and_cgroup_sockmap_on() {
    kernel_capture_records_destination_and_cgroup(true);
}

fn kernel_capture_records_destination_and_cgroup(sockmap: bool) {
    require_root("kernel_capture_records_destination_and_cgroup");
    let ns = Netns::new(&unique("cap"));
    ns.add_local_addr("nm0", "10.203.0.1/24");
    let mut cg = TestCgroup::new(&unique("cap"));
    // A Burstable-style layout: the pod two levels down, its container one further.
    let pod = cg.child("burstable/pod-client");
    let container = cg.child("burstable/pod-client/ctr");
    let stranger = cg.child("burstable/pod-stranger");

    let proxy: SocketAddrV4 = "10.203.0.1:15001".parse().expect("addr");
    let mut dp = Datapath::load(&DatapathConfig {
        cgroup_root: cg.path().to_path_buf(),
        proxy_addr: proxy,
        proxy_mark: 0x4e4d,
        redirect: true,
        // The capture mechanics, on any destination (the daemon's default captures only the
        // mesh's; the datapath suite checks that).
        capture_all: true,
        sockmap,
        splice_window: 4 << 20,
        mesh_source: mesh_daemon::state::desired::MeshSource::single(
            std::net::Ipv4Addr::UNSPECIFIED,
        ),
        spread_ports: 0..0,
        pin_dir: None,
    })
    .expect("load and attach the eBPF programs");
    let pod_id = dp
        .enroll(
            &pod,
            &mesh_daemon::ebpf::loader::EnrollSpec {
                workload_id: 7,
                strict: false,
                probe_ports: vec![],
            },
        )
        .expect("enroll");
    assert_eq!(
        dp.program_names()
            .contains(&mesh_common::prog_names::SPLICE),
        sockmap,
        "the splice verdict is loaded exactly with --sockmap on"
    );
    println!(
        "attached {:?} to cgroup {} (multi-attach links); enrolled pod cgroup id {pod_id}",
        dp.program_names(),
        cg.path().display()
    );

    // The "proxy" and an ordinary server, both inside the namespace.
    let (proxy_l, server_l) = ns
        .run(move || {
            let p = TcpListener::bind(SocketAddr::V4(proxy)).expect("bind proxy");
            let s = TcpListener::bind("10.203.0.1:7000").expect("bind server");
            (p, s)
        })
        .join()
        .expect("bind thread");

    // Enrolled (from a container cgroup below the pod): captured and sent to the proxy although
    // it dialled port 9, where nothing listens.
    let accept = std::thread::spawn(move || {
        let (mut s, peer) = proxy_l.accept().expect("proxy accept");
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).expect("read greeting");
        drop(s);
        (peer, buf)
    });
    let out = app(&container, &ns, &["connect", "10.203.0.1:9", "--send", "5"]);
    let (peer, buf) = accept.join().expect("accept thread");
    assert!(
        out.contains("peer=10.203.0.1:9"),
        "getpeername must show the original destination: {out}"
    );
    assert_eq!(buf.len(), 5);
    let rec = dp
        .orig_dst_table()
        .take(&conn_key(peer, proxy.port(), || 0))
        .expect("sockops stored a record under the client's address");
    assert_eq!(orig_dst_addr(&rec), "10.203.0.1:9".parse().expect("addr"));
    assert_eq!(
        rec.cgroup_id, pod_id,
        "identity is the pod-level cgroup, not the container's"
    );
    assert_eq!(rec.workload_id, 7);
    assert!(
        dp.orig_dst_table()
            .take(&conn_key(peer, proxy.port(), || 0))
            .is_none(),
        "records are taken once"
    );
    println!(
        "observed: connection from {peer} (cgroup {pod_id}) to 10.203.0.1:9 captured and redirected to {proxy}"
    );

    // Not enrolled: goes where it was sent.
    let accept = std::thread::spawn(move || server_l.accept().expect("server accept").1);
    let out = app(&stranger, &ns, &["connect", "10.203.0.1:7000"]);
    let direct_peer = accept.join().expect("accept thread");
    assert!(out.contains("peer=10.203.0.1:7000"), "{out}");
    assert!(
        dp.orig_dst_table()
            .take(&conn_key(direct_peer, 7000, || 0))
            .is_none()
    );

    let counters: std::collections::HashMap<_, _> = dp.counters().into_iter().collect();
    println!("kernel counters: {counters:?}");
    assert!(counters[&Counter::ConnectSeen] >= 2);
    assert_eq!(counters[&Counter::ConnectEnrolled], 1);
    assert_eq!(counters[&Counter::Redirected], 1);
    assert_eq!(counters[&Counter::SockopsRekeyed], 1);
    assert!(counters[&Counter::PeernameRestored] >= 1);

    // Clean detach: none of the programs attached to this test's cgroup (nor their maps) stays
    // loaded once the datapath is dropped.
    let ours = Footprint::of(&[cg.path()], &[]);
    assert!(
        !ours.progs.is_empty(),
        "no program attached to {}",
        cg.path().display()
    );
    drop(dp);
    std::thread::sleep(Duration::from_millis(100));
    ours.assert_gone("after detach");
}
