//! `cordon:tool/database`: opens granted handles and runs queries through
//! the shared [`Databases`](crate::db::Databases) backends.

use wasmtime::component::Resource;

use super::super::bindings::cordon::tool::database::{self, Dialect, Error, Rows, Value};
use super::super::state::HostState;
use crate::db::{self, DbError, DbGrant};

/// An open handle in the guest's resource table.
// `pub`: the generated bindings re-export it as the WIT resource type.
#[allow(unreachable_pub)]
pub struct DbConnection {
    grant: DbGrant,
}

impl database::Host for HostState {
    fn open(&mut self, name: String) -> Result<Resource<DbConnection>, Error> {
        let Some(grant) = self.databases.grants.get(&name).cloned() else {
            // Recorded for the audit trail: a tool reaching for a handle it
            // was not given (or another tenant's) is worth knowing about.
            if !self.databases.denied.contains(&name) {
                self.databases.denied.push(name.clone());
            }
            return Err(to_wit(DbError::NotGranted(name)));
        };
        self.databases.registry.check(&grant).map_err(to_wit)?;
        self.table
            .push(DbConnection { grant })
            .map_err(|e| Error::Unavailable(format!("cannot open another handle: {e}")))
    }

    fn granted(&mut self) -> Vec<String> {
        self.databases.grants.keys().cloned().collect()
    }
}

impl database::HostConnection for HostState {
    fn dialect(&mut self, conn: Resource<DbConnection>) -> Dialect {
        match self.table.get(&conn).map(|c| c.grant.dialect()) {
            Ok(db::Dialect::Postgres) => Dialect::Postgres,
            _ => Dialect::Sqlite,
        }
    }

    async fn query(
        &mut self,
        conn: Resource<DbConnection>,
        sql: String,
        params: Vec<Value>,
    ) -> Result<Rows, Error> {
        let grant = match self.table.get(&conn) {
            Ok(c) => c.grant.clone(),
            Err(e) => return Err(Error::Failed(format!("invalid connection handle: {e}"))),
        };
        let params = params.into_iter().map(from_wit).collect();
        let rows = self
            .databases
            .registry
            .query(&grant, &sql, params)
            .await
            .map_err(to_wit)?;
        Ok(Rows {
            columns: rows
                .columns
                .into_iter()
                .map(|c| database::Column {
                    name: c.name,
                    type_name: c.type_name,
                })
                .collect(),
            rows: rows
                .rows
                .into_iter()
                .map(|row| row.into_iter().map(into_wit).collect())
                .collect(),
            truncated: rows.truncated,
        })
    }

    fn drop(&mut self, conn: Resource<DbConnection>) -> wasmtime::Result<()> {
        self.table.delete(conn)?;
        Ok(())
    }
}

fn from_wit(value: Value) -> db::Value {
    match value {
        Value::Null => db::Value::Null,
        Value::Integer(n) => db::Value::Integer(n),
        Value::Real(f) => db::Value::Real(f),
        Value::Text(s) => db::Value::Text(s),
        Value::Blob(b) => db::Value::Blob(b),
        Value::Boolean(b) => db::Value::Boolean(b),
        Value::Timestamp(t) => db::Value::Timestamp(t),
        Value::Json(s) => db::Value::Json(s),
    }
}

fn into_wit(value: db::Value) -> Value {
    match value {
        db::Value::Null => Value::Null,
        db::Value::Integer(n) => Value::Integer(n),
        db::Value::Real(f) => Value::Real(f),
        db::Value::Text(s) => Value::Text(s),
        db::Value::Blob(b) => Value::Blob(b),
        db::Value::Boolean(b) => Value::Boolean(b),
        db::Value::Timestamp(t) => Value::Timestamp(t),
        db::Value::Json(s) => Value::Json(s),
    }
}

fn to_wit(e: DbError) -> Error {
    let message = e.to_string();
    match e {
        DbError::NotGranted(_) => Error::NotGranted(message),
        DbError::Syntax(_) => Error::Syntax(message),
        DbError::Denied(_) => Error::Denied(message),
        DbError::Timeout(_) => Error::Timeout(message),
        DbError::TooLarge(_) => Error::TooLarge(message),
        DbError::InvalidParameter(_) => Error::InvalidParameter(message),
        DbError::Unavailable(_) => Error::Unavailable(message),
        DbError::Failed(_) => Error::Failed(message),
    }
}
