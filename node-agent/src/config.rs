//! Configuration from flags or environment variables.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

/// spright-node-agent: attaches in-kernel request accounting to the pods of
/// this node and serves each pod its own counters.
#[derive(Debug, Clone, Parser)]
#[command(name = "spright-node-agent", version)]
pub struct Config {
    /// Address the pods read their counters from (the node's address, which a
    /// sidecar sees as HOST_IP). Only a registered pod's IP gets an answer, and
    /// only about itself.
    #[arg(
        long,
        env = "SPRIGHT_AGENT_NODE_ADDRESS",
        default_value = "0.0.0.0:9095"
    )]
    pub node_address: SocketAddr,
    /// Registration API (POST/DELETE /v1/pods). Keep it on loopback: whoever
    /// reaches it decides which cgroups get programs.
    #[arg(
        long,
        env = "SPRIGHT_AGENT_ADMIN_ADDRESS",
        default_value = "127.0.0.1:9096"
    )]
    pub admin_address: SocketAddr,
    /// Edge mode: a directory of pod manifests (`*.json`, one pod each),
    /// watched for changes.
    #[arg(long, env = "SPRIGHT_AGENT_MANIFEST_DIR")]
    pub manifest_dir: Option<PathBuf>,
    /// Cluster mode: watch this node's Pods in the Kubernetes API (in-cluster
    /// configuration or KUBECONFIG) and attach those running queue-proxy-ebpf.
    #[arg(long, env = "SPRIGHT_AGENT_CLUSTER")]
    pub cluster: bool,
    /// Cluster mode: this node's name (the DaemonSet passes `spec.nodeName`).
    #[arg(long, env = "NODE_NAME", required_if_eq("cluster", "true"))]
    pub node_name: Option<String>,
    /// Cluster mode: a pod is ours when its `queue-proxy` container's image
    /// contains this.
    #[arg(
        long,
        env = "SPRIGHT_AGENT_IMAGE_MATCH",
        default_value = "queue-proxy-ebpf"
    )]
    pub image_match: String,
    /// cgroup v2 mount; every pod cgroup must lie below it.
    #[arg(long, env = "SPRIGHT_AGENT_CGROUP_ROOT", default_value = spright_ebpf::DEFAULT_CGROUP_PATH)]
    pub cgroup_root: PathBuf,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_flags() {
        let c = Config::try_parse_from(["spright-node-agent"]).unwrap();
        assert_eq!(c.node_address.port(), 9095);
        assert!(c.admin_address.ip().is_loopback());
        let c = Config::try_parse_from([
            "spright-node-agent",
            "--node-address",
            "10.0.0.1:1234",
            "--manifest-dir",
            "/tmp/pods",
        ])
        .unwrap();
        assert_eq!(c.node_address, "10.0.0.1:1234".parse().unwrap());
        assert_eq!(c.manifest_dir, Some(PathBuf::from("/tmp/pods")));
        assert!(Config::try_parse_from(["spright-node-agent", "--node-address", "x"]).is_err());
        let c = Config::try_parse_from(["spright-node-agent", "--cluster", "--node-name", "n1"])
            .unwrap();
        assert!(c.cluster);
        assert_eq!(c.node_name.as_deref(), Some("n1"));
        assert_eq!(c.image_match, "queue-proxy-ebpf");
    }
}
