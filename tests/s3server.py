"""A real S3 server on loopback for the tests: moto's ThreadedMotoServer with IAM auth on.

Run as a script: starts the server on 127.0.0.1 (free port), creates an IAM user with an
S3 policy and an access key, creates the bucket ``nbdask``, prints one JSON line
{"endpoint", "key", "secret"} and serves until its standard input closes.
"""

import json
import os
import sys

# Every request after the first three (user, policy, key) must carry valid credentials.
os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


def main() -> None:
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    anon = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="bootstrap",
                aws_secret_access_key="bootstrap")
    iam = boto3.client("iam", **anon)
    iam.create_user(UserName="nbdask")
    iam.put_user_policy(UserName="nbdask", PolicyName="s3", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName="nbdask")["AccessKey"]
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                      aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"])
    s3.create_bucket(Bucket="nbdask")
    print(json.dumps({"endpoint": endpoint, "key": key["AccessKeyId"], "secret": key["SecretAccessKey"]}),
          flush=True)
    sys.stdin.read()
    server.stop()


if __name__ == "__main__":
    main()
