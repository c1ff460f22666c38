"""Operations, apart from the science: files written whole (`atomic`), the locks a sweep takes (`locks`), the
lab's shared stack (`services`, `pg_roles`, `server_user`) and local web servers (`serve`)."""
