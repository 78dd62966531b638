//! `sql`: read-only SQL over the database handles the operator grants.
//!
//! Three tools: `sql_list_tables` (tables and views), `sql_describe_table`
//! (columns, types, keys) and `sql_query` (one read-only statement with
//! parameters). Rows come back twice: as structured content (one JSON object
//! per row) for programs, and as a plain-text table for the model to read.
//!
//! Every tool takes an optional `database`, the handle name; when the tool is
//! granted exactly one handle it is the default. Writes are impossible by
//! construction (the host refuses them), so the tools are all read-only.

use cordon_guest::db::{self, Connection, Dialect, Rows, Value};
use cordon_guest::prelude::*;
use cordon_guest::serde_json::{Map, Value as Json};

/// The widest cell in the text table, in characters.
const MAX_CELL: usize = 60;

#[derive(Deserialize, JsonSchema)]
struct ListArgs {
    /// The database handle; optional when exactly one is granted.
    database: Option<String>,
}

#[derive(Deserialize, JsonSchema)]
struct DescribeArgs {
    /// The database handle; optional when exactly one is granted.
    database: Option<String>,
    /// The table or view to describe.
    #[schemars(length(min = 1))]
    table: String,
}

#[derive(Deserialize, JsonSchema)]
struct QueryArgs {
    /// The database handle; optional when exactly one is granted.
    database: Option<String>,
    /// One read-only SQL statement. Placeholders: `?1`, `?2` in SQLite,
    /// `$1`, `$2` in PostgreSQL.
    #[schemars(length(min = 1))]
    sql: String,
    /// Values for the placeholders, in order: strings, numbers, booleans or null.
    #[serde(default)]
    params: Vec<Json>,
}

/// Rows of a query.
#[derive(Serialize, JsonSchema)]
struct QueryOutput {
    /// The handle that answered.
    database: String,
    /// Column names, in order.
    columns: Vec<String>,
    /// One object per row, keyed by column name.
    rows: Vec<Map<String, Json>>,
    /// True when the host cut the result at the handle's row or byte limit.
    truncated: bool,
}

/// The tables and views of a database.
#[derive(Serialize, JsonSchema)]
struct TableList {
    /// The handle that answered.
    database: String,
    /// Tables and views, sorted by name.
    tables: Vec<TableInfo>,
}

/// One table or view.
#[derive(Serialize, JsonSchema)]
struct TableInfo {
    /// Its name.
    name: String,
    /// `table` or `view`.
    kind: String,
}

/// The columns of a table.
#[derive(Serialize, JsonSchema)]
struct TableDescription {
    /// The handle that answered.
    database: String,
    /// The table.
    table: String,
    /// Its columns, in order.
    columns: Vec<ColumnInfo>,
}

/// One column.
#[derive(Serialize, JsonSchema)]
struct ColumnInfo {
    /// Its name.
    name: String,
    /// Its declared type.
    #[serde(rename = "type")]
    type_name: String,
    /// Whether it may hold NULL.
    nullable: bool,
    /// Whether it is part of the primary key.
    primary_key: bool,
}

/// Opens `requested`, or the only granted handle.
fn connect(requested: Option<String>) -> ToolResult<(String, Connection)> {
    let name = match requested {
        Some(name) => name,
        None => {
            let granted = db::granted();
            match granted.as_slice() {
                [only] => only.clone(),
                [] => bail!(
                    "no database is granted to this tool; the operator grants handles in tools.sql.databases"
                ),
                many => bail!(
                    "several databases are granted ({}): pass `database`",
                    many.join(", ")
                ),
            }
        }
    };
    let conn = db::open(&name)?;
    Ok((name, conn))
}

fn text(row: &[Value], i: usize) -> String {
    match row.get(i) {
        Some(Value::Text(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => String::new(),
    }
}

fn list_tables(args: ListArgs) -> ToolResult<Structured<TableList>> {
    let (database, conn) = connect(args.database)?;
    let sql = match conn.dialect() {
        Dialect::Sqlite => {
            "SELECT name, type FROM sqlite_schema \
             WHERE type IN ('table', 'view') AND name NOT LIKE 'sqlite_%' ORDER BY name"
        }
        Dialect::Postgres => {
            "SELECT table_name::text, CASE table_type WHEN 'VIEW' THEN 'view' ELSE 'table' END \
             FROM information_schema.tables \
             WHERE table_schema = current_schema() ORDER BY table_name"
        }
    };
    let rows = conn.query(sql, &[])?;
    let tables: Vec<TableInfo> = rows
        .rows
        .iter()
        .map(|r| TableInfo {
            name: text(r, 0),
            kind: text(r, 1),
        })
        .collect();
    let listing = if tables.is_empty() {
        format!("{database}: no tables.")
    } else {
        let names: Vec<String> = tables
            .iter()
            .map(|t| match t.kind.as_str() {
                "view" => format!("{} (view)", t.name),
                _ => t.name.clone(),
            })
            .collect();
        format!("{database}: {}", names.join(", "))
    };
    Ok(Structured::new(TableList { database, tables }).with_text(listing))
}

fn describe_table(args: DescribeArgs) -> ToolResult<Structured<TableDescription>> {
    let (database, conn) = connect(args.database)?;
    let (sql, table) = match conn.dialect() {
        Dialect::Sqlite => (
            "SELECT name, type, \"notnull\" = 0, pk > 0 FROM pragma_table_info(?1) ORDER BY cid",
            args.table.clone(),
        ),
        Dialect::Postgres => (
            "SELECT c.column_name::text, c.data_type::text, c.is_nullable = 'YES', \
                    EXISTS (SELECT 1 FROM information_schema.key_column_usage k \
                            JOIN information_schema.table_constraints t \
                              ON t.constraint_name = k.constraint_name AND t.table_schema = k.table_schema \
                            WHERE t.constraint_type = 'PRIMARY KEY' AND k.table_schema = c.table_schema \
                              AND k.table_name = c.table_name AND k.column_name = c.column_name) \
             FROM information_schema.columns c \
             WHERE c.table_schema = current_schema() AND c.table_name = $1 ORDER BY c.ordinal_position",
            args.table.clone(),
        ),
    };
    let rows = conn.query(sql, &[Value::Text(table)])?;
    let flag =
        |v: Option<&Value>| matches!(v, Some(Value::Integer(1)) | Some(Value::Boolean(true)));
    let columns: Vec<ColumnInfo> = rows
        .rows
        .iter()
        .map(|r| ColumnInfo {
            name: text(r, 0),
            type_name: text(r, 1),
            nullable: flag(r.get(2)),
            primary_key: flag(r.get(3)),
        })
        .collect();
    if columns.is_empty() {
        bail!(
            "{database} has no table or view named {:?}; sql_list_tables lists them",
            args.table
        );
    }
    let lines: Vec<String> = columns
        .iter()
        .map(|c| {
            let mut line = format!("  {} {}", c.name, c.type_name);
            if c.primary_key {
                line.push_str(" PRIMARY KEY");
            }
            if !c.nullable {
                line.push_str(" NOT NULL");
            }
            line
        })
        .collect();
    let text = format!("{}.{}:\n{}", database, args.table, lines.join("\n"));
    Ok(Structured::new(TableDescription {
        database,
        table: args.table,
        columns,
    })
    .with_text(text))
}

fn param(v: &Json) -> ToolResult<Value> {
    Ok(match v {
        Json::Null => Value::Null,
        Json::Bool(b) => Value::Boolean(*b),
        Json::Number(n) => match n.as_i64() {
            Some(i) => Value::Integer(i),
            None => Value::Real(n.as_f64().unwrap_or(f64::NAN)),
        },
        Json::String(s) => Value::Text(s.clone()),
        other => Value::Json(other.to_string()),
    })
}

fn query(args: QueryArgs) -> ToolResult<Structured<QueryOutput>> {
    let (database, conn) = connect(args.database)?;
    let params = args
        .params
        .iter()
        .map(param)
        .collect::<ToolResult<Vec<_>>>()?;
    let rows: Rows = conn.query(&args.sql, &params)?;
    let table = rows.to_text_table(MAX_CELL);
    let objects = match rows.to_json() {
        Json::Array(items) => items
            .into_iter()
            .filter_map(|o| match o {
                Json::Object(map) => Some(map),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    Ok(Structured::new(QueryOutput {
        database,
        columns: rows.columns.iter().map(|c| c.name.clone()).collect(),
        rows: objects,
        truncated: rows.truncated,
    })
    .with_text(table))
}

cordon_guest::export_tools!(
    Tool::new(
        "sql_list_tables",
        "Lists the tables and views of a granted database."
    )
    .title("List tables")
    .read_only()
    .idempotent()
    .closed_world()
    .run(list_tables),
    Tool::new(
        "sql_describe_table",
        "Describes a table's columns: names, types, nullability and primary key."
    )
    .title("Describe table")
    .read_only()
    .idempotent()
    .closed_world()
    .run(describe_table),
    Tool::new(
        "sql_query",
        "Runs one read-only SQL statement (SELECT, WITH, ...) on a granted database and returns the rows. \
         Writes are refused. Use placeholders and params for values."
    )
    .title("Query")
    .read_only()
    .idempotent()
    .closed_world()
    .run(query),
);

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::*;

    #[test]
    fn params_map_json_to_sql_values() {
        assert_eq!(param(&Json::Null).unwrap(), Value::Null);
        assert_eq!(param(&serde_json::json!(3)).unwrap(), Value::Integer(3));
        assert_eq!(param(&serde_json::json!(2.5)).unwrap(), Value::Real(2.5));
        assert_eq!(
            param(&serde_json::json!("x")).unwrap(),
            Value::Text("x".into())
        );
        assert_eq!(
            param(&serde_json::json!(true)).unwrap(),
            Value::Boolean(true)
        );
    }

    #[test]
    fn natively_there_is_no_database() {
        let r = cordon_guest::call_tool(&cordon_tools(), "sql_list_tables", "{}").unwrap();
        assert!(r.is_error);
    }
}
