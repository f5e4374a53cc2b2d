//! The table's ZooKeeper credentials and TLS material, read from the Secrets
//! `spec.zookeeper.auth` and `spec.zookeeper.tls` name (`get` on those names only).

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use rtable_protocol::zk_access::{ZkAccess, ZkTls};
use rtable_protocol::zk_acl::DigestCredentials;

use crate::crd::ReplicatedTable;
use crate::error::{Error, kube_err};

/// Everything but the address the operator needs to open a session for this table.
pub async fn zk_access(rt: &ReplicatedTable, client: &Client, ns: &str) -> Result<ZkAccess, Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let mut access = ZkAccess::default();
    if let Some(auth) = &rt.spec.zookeeper.auth {
        let field = "spec.zookeeper.auth";
        let text = read_key(&secrets, ns, field, &auth.secret_name, &auth.key).await?;
        let source = format!("Secret {} key {}", auth.secret_name, auth.key);
        access.credentials = Some(
            DigestCredentials::parse(&text)
                .map_err(|e| Error::Auth(format!("{field}: {source}: {e}")))?,
        );
        access.credentials_source = source;
        access.world_read = auth.world_readable;
    }
    if let Some(tls) = &rt.spec.zookeeper.tls {
        let field = "spec.zookeeper.tls";
        let ca_pem = read_key(&secrets, ns, field, &tls.secret_name, "ca.crt").await?;
        let client = if tls.client_certificate {
            Some((
                read_key(&secrets, ns, field, &tls.secret_name, "tls.crt").await?,
                read_key(&secrets, ns, field, &tls.secret_name, "tls.key").await?,
            ))
        } else {
            None
        };
        access.tls = Some(ZkTls { ca_pem, client });
    }
    Ok(access)
}

async fn read_key(
    secrets: &Api<Secret>,
    ns: &str,
    field: &str,
    name: &str,
    key: &str,
) -> Result<String, Error> {
    let secret = secrets
        .get_opt(name)
        .await
        .map_err(kube_err(format!("get secret {name}")))?
        .ok_or_else(|| {
            Error::Auth(format!(
                "{field}: Secret {name} does not exist in namespace {ns}"
            ))
        })?;
    let value = secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .ok_or_else(|| Error::Auth(format!("{field}: Secret {name} has no key {key}")))?;
    String::from_utf8(value.0.clone()).map_err(|_| {
        Error::Auth(format!(
            "{field}: Secret {name} key {key} is not UTF-8 text"
        ))
    })
}
