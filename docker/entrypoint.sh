#!/bin/sh
# Docker secrets for Carina: for every CARINA_<NAME>_FILE=/run/secrets/x in the
# environment, export CARINA_<NAME> with the file's content (its trailing
# newline dropped) and remove CARINA_<NAME>_FILE, then run the command. So a
# secret such as the database URL (CARINA_DATABASE__URL, which carries the
# password) comes from a file, never from the compose file or the image.
# Other variables pass through unchanged.
set -eu
for file_var in $(env | sed -n 's/^\(CARINA_[A-Za-z0-9_]*\)_FILE=.*$/\1/p'); do
    path=$(printenv "${file_var}_FILE")
    if [ ! -r "$path" ]; then
        echo "entrypoint: ${file_var}_FILE names $path, which cannot be read" >&2
        exit 2
    fi
    value=$(cat "$path")
    export "$file_var=$value"
    unset "${file_var}_FILE"
done
exec "$@"
