//! Building the kube `Client`: an explicit kubeconfig file, or the usual inference
//! (in-cluster service account, then `$KUBECONFIG`, then `~/.kube/config`).
use std::path::Path;

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use crate::Error;

/// Load a client configuration. Fails early, with the file named, on a garbage kubeconfig.
pub async fn load_config(kubeconfig: Option<&Path>) -> Result<Config, Error> {
    match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).map_err(|source| Error::Kubeconfig {
                path: path.to_path_buf(),
                source,
            })?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|source| Error::Kubeconfig {
                    path: path.to_path_buf(),
                    source,
                })
        }
        None => Config::infer()
            .await
            .map_err(|e| Error::ClientConfig(e.to_string())),
    }
}

/// Build a client. Creating it does not contact the API server; an unreachable server
/// shows up as watch errors (logged, retried with backoff) and a not-ready `/readyz`.
pub async fn make_client(kubeconfig: Option<&Path>) -> Result<(Client, Config), Error> {
    let config = load_config(kubeconfig).await?;
    let client = Client::try_from(config.clone()).map_err(Error::Client)?;
    Ok((client, config))
}
