//! Asking for the reboot, over D-Bus: logind's `Manager.Reboot` (it honours
//! inhibitors and is what `systemctl reboot` uses), or, where logind is
//! absent, systemd's `StartUnit("reboot.target", "replace-irreversibly")`.
//! Never by running a program.

use crate::systemd::Systemd1ManagerProxy;
use zbus::proxy;

#[proxy(
    interface = "org.freedesktop.login1.Manager",
    default_service = "org.freedesktop.login1",
    default_path = "/org/freedesktop/login1"
)]
trait Login1Manager {
    fn reboot(&self, interactive: bool) -> zbus::Result<()>;
}

/// Which service accepted the request.
pub async fn request() -> Result<&'static str, String> {
    let conn = zbus::Connection::system()
        .await
        .map_err(|e| format!("cannot connect to the system D-Bus: {e}"))?;
    let logind = match Login1ManagerProxy::new(&conn).await {
        Ok(p) => p.reboot(false).await,
        Err(e) => Err(e),
    };
    match logind {
        Ok(()) => Ok("logind"),
        Err(e) if logind_absent(&e) => {
            tracing::info!("logind is not available ({e}); asking systemd to start reboot.target");
            let systemd = Systemd1ManagerProxy::new(&conn)
                .await
                .map_err(|e| format!("systemd over D-Bus: {e}"))?;
            systemd
                .start_unit("reboot.target", "replace-irreversibly")
                .await
                .map(|_| "systemd")
                .map_err(|e| format!("systemd refused to start reboot.target: {e}"))
        }
        Err(e) => Err(format!("logind refused to reboot: {e}")),
    }
}

fn logind_absent(e: &zbus::Error) -> bool {
    let name = match e {
        zbus::Error::MethodError(name, _, _) => name.as_str(),
        zbus::Error::FDO(f) => {
            return matches!(
                **f,
                zbus::fdo::Error::ServiceUnknown(_) | zbus::fdo::Error::NameHasNoOwner(_)
            );
        }
        _ => return false,
    };
    matches!(
        name,
        "org.freedesktop.DBus.Error.ServiceUnknown"
            | "org.freedesktop.DBus.Error.NameHasNoOwner"
            | "org.freedesktop.systemd1.NoSuchUnit"
            | "org.freedesktop.DBus.Error.UnknownObject"
            | "org.freedesktop.DBus.Error.UnknownMethod"
    )
}
