//! `cargo xtask kube-test-server`: the Kubernetes suite's API server (etcd + kube-apiserver on
//! 127.0.0.1, TokenRequest and TokenReview on) for trying things by hand. Runs until Ctrl-C or
//! SIGTERM, then stops both and removes its folder.

fn main() {
    let server = nodemesh_tests::kube::KubeServer::start("manual");
    println!(
        "kube-apiserver ready at {}\n  export KUBECONFIG={}\n(Ctrl-C stops it)",
        server.url(),
        server.kubeconfig.display()
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    });
    drop(server);
    println!("stopped");
}
