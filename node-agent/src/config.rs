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
    use clap::CommandFactory;
    use serde_yaml::Value;

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

    /// The DaemonSet in config/node-agent: its flags and environment must be ones this
    /// agent reads, and must run it in cluster mode for its own node, on the node's address,
    /// with the cgroup root it mounts; the RBAC must let it watch Pods.
    #[test]
    fn the_daemonset_manifest_matches_the_configuration() {
        let text = include_str!("../../config/node-agent/node-agent.yaml");
        let docs: Vec<Value> = serde_yaml::Deserializer::from_str(text)
            .map(|d| serde::Deserialize::deserialize(d).expect("YAML"))
            .collect();
        let kind = |k: &str| -> &Value {
            docs.iter()
                .find(|d| d["kind"] == k)
                .unwrap_or_else(|| panic!("no {k} in the manifest"))
        };
        let ds = kind("DaemonSet");
        let pod = &ds["spec"]["template"]["spec"];
        assert_eq!(pod["hostNetwork"], true, "the sidecars reach HOST_IP");
        assert_eq!(pod["hostPID"], true, "/proc/<pid>/ns/net and pidfd_getfd");
        let container = &pod["containers"][0];
        assert_eq!(container["securityContext"]["privileged"], true);

        // The environment, with the downward API filled in and $(VAR) expanded, as the
        // kubelet does.
        let mut env: Vec<(String, String)> = Vec::new();
        for e in container["env"].as_sequence().expect("env") {
            let name = e["name"].as_str().expect("env name").to_owned();
            let value = match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                Some("spec.nodeName") => "node-7".to_owned(),
                Some("status.hostIP") => "10.9.8.7".to_owned(),
                Some(other) => panic!("{name}: unexpected fieldPath {other}"),
                None => {
                    let mut v = e["value"].as_str().expect("env value").to_owned();
                    for (k, val) in &env {
                        v = v.replace(&format!("$({k})"), val);
                    }
                    v
                }
            };
            env.push((name, value));
        }
        // Each variable becomes the flag that reads it: one the agent does not read is drift.
        let command = Config::command();
        let mut argv: Vec<String> = vec!["spright-node-agent".into()];
        for a in container["args"].as_sequence().into_iter().flatten() {
            argv.push(a.as_str().expect("arg").to_owned());
        }
        for (name, value) in &env {
            if name == "HOST_IP" {
                // Only for $(HOST_IP) above.
                continue;
            }
            let arg = command
                .get_arguments()
                .find(|a| a.get_env().is_some_and(|e| e == name.as_str()))
                .unwrap_or_else(|| panic!("the agent reads no variable {name}"));
            let long = arg.get_long().expect("long flag");
            if matches!(arg.get_action(), clap::ArgAction::SetTrue) {
                assert_eq!(value, "true", "{name}");
                argv.push(format!("--{long}"));
            } else {
                argv.push(format!("--{long}={value}"));
            }
        }
        let cfg = Config::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
        assert!(cfg.cluster, "cluster mode");
        assert_eq!(cfg.node_name.as_deref(), Some("node-7"), "NODE_NAME");
        // queue-proxy-ebpf reads http://$HOST_IP:$SPRIGHT_AGENT_PORT (default 9095).
        assert_eq!(cfg.node_address, "10.9.8.7:9095".parse().unwrap());
        assert!(cfg.admin_address.ip().is_loopback());
        for probe in ["readinessProbe", "livenessProbe"] {
            let get = &container[probe]["httpGet"];
            assert_eq!(get["path"], "/healthz", "{probe}");
            assert_eq!(
                get["port"].as_u64(),
                Some(u64::from(cfg.admin_address.port()))
            );
            assert_eq!(get["host"], cfg.admin_address.ip().to_string().as_str());
        }
        assert_eq!(cfg.image_match, "queue-proxy-ebpf");

        // The cgroup root is the node's cgroup v2 hierarchy, mounted from the host.
        let mount = container["volumeMounts"]
            .as_sequence()
            .into_iter()
            .flatten()
            .find(|m| m["mountPath"].as_str() == cfg.cgroup_root.to_str())
            .unwrap_or_else(|| panic!("nothing mounted at {}", cfg.cgroup_root.display()));
        let volume = |name: &Value| {
            pod["volumes"]
                .as_sequence()
                .into_iter()
                .flatten()
                .find(|v| v["name"] == *name)
                .unwrap_or_else(|| panic!("no volume {name:?}"))
                .clone()
        };
        assert_eq!(volume(&mount["name"])["hostPath"]["path"], "/sys/fs/cgroup");
        let bpffs = container["volumeMounts"]
            .as_sequence()
            .into_iter()
            .flatten()
            .find(|m| m["mountPath"] == "/sys/fs/bpf")
            .expect("bpffs mount");
        assert_eq!(volume(&bpffs["name"])["hostPath"]["path"], "/sys/fs/bpf");

        // RBAC: the service account may get, list and watch Pods.
        let sa = kind("ServiceAccount");
        assert_eq!(pod["serviceAccountName"], sa["metadata"]["name"]);
        let role = kind("ClusterRole");
        let rule = role["rules"]
            .as_sequence()
            .into_iter()
            .flatten()
            .find(|r| {
                r["resources"]
                    .as_sequence()
                    .is_some_and(|rs| rs.iter().any(|x| x == "pods"))
            })
            .expect("a rule for pods");
        assert_eq!(rule["apiGroups"][0], "");
        for verb in ["get", "list", "watch"] {
            assert!(
                rule["verbs"]
                    .as_sequence()
                    .is_some_and(|vs| vs.iter().any(|v| v == verb)),
                "verb {verb}"
            );
        }
        let binding = kind("ClusterRoleBinding");
        assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
        assert_eq!(binding["subjects"][0]["name"], sa["metadata"]["name"]);
        assert_eq!(
            binding["subjects"][0]["namespace"],
            sa["metadata"]["namespace"]
        );
        assert_eq!(ds["metadata"]["namespace"], sa["metadata"]["namespace"]);
    }
}
